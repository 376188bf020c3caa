"""Compare the perturbation model with the baselines on held-out groups, in one run.

:func:`compare_methods` trains every method on the cells outside a :class:`HoldoutSplit`, predicts
each held-out group (cell type, drug, dose) from that cell type's control cells, and scores the
prediction against the held-out cells with :func:`~genailab.perturb.evaluate.perturbation_metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from sklearn.decomposition import PCA

from genailab.data.validation import check_expression
from genailab.errors import ConfigError, InputDataError
from genailab.anndata_models.perturbation import PerturbationModel
from genailab.perturb.baselines import AdditiveShift, LatentArithmetic, NoChange, RidgeCovariates
from genailab.perturb.evaluate import HoldoutSplit, cell_groups, cell_types, log_normalize, perturbation_metrics
from genailab.data.perturbation_schema import ObsKeys

logger = logging.getLogger(__name__)

METRICS = ("r2_mean", "r2_mean_top_de", "r2_delta", "r2_delta_top_de", "energy")
_PCA_CELLS = 3000  # training cells the PCA of the energy distance is fitted on


class CounterfactualVAE:
    """The :class:`~genailab.anndata_models.perturbation.PerturbationModel` as a benchmark method (one count sample per cell)."""

    name = "genailab"

    def __init__(self, *, train_options: dict | None = None, **model_options):
        self.train_options = dict(train_options or {})
        self.model_options = model_options

    def fit(self, adata: AnnData, *, keys: ObsKeys, layer: str | None = None) -> CounterfactualVAE:
        self.model = PerturbationModel(
            adata, drug_key=keys.drug, dose_key=keys.dose, cell_type_key=keys.cell_type,
            control_value=keys.control, layer=layer, **self.model_options,
        )  # fmt: skip
        self.model.fit(**self.train_options)
        return self

    def predict(self, control: AnnData, *, drug: str, dose: float) -> np.ndarray:
        return log_normalize(self.model.predict(control, drug=drug, dose=dose).layers["sampled"])


def default_methods(
    *, latent_dim: int = 10, hidden_dims: Sequence[int] = (128,), train_options: dict | None = None
) -> list:
    """The four baselines and the model; both neural methods share architecture size and training options."""
    shared = dict(latent_dim=latent_dim, hidden_dims=tuple(hidden_dims), train_options=train_options)
    return [NoChange(), AdditiveShift(), RidgeCovariates(), LatentArithmetic(**shared), CounterfactualVAE(**shared)]


def compare_methods(
    adata: AnnData,
    split: HoldoutSplit,
    *,
    keys: ObsKeys = ObsKeys(),
    layer: str | None = "counts",
    methods: Sequence | None = None,
    min_cells: int = 10,
    n_top_genes: int = 50,
    n_comps: int = 20,
    seed: int = 0,
) -> pd.DataFrame:
    """Train every method without the held-out groups and score its predictions of them.

    Parameters
    ----------
    adata
        Raw counts in ``layer`` (``X`` when None), drug/dose/cell-type columns named by ``keys``.
    split
        What to hold out (:func:`~genailab.perturb.evaluate.holdout_split`).
    methods
        Objects with ``name``, ``fit(adata, keys=, layer=)`` and ``predict(control, drug=, dose=)``;
        default :func:`default_methods`.
    min_cells
        Held-out groups with fewer cells are not scored (they stay out of training).

    Returns
    -------
    One row per held-out group and method: protocol, cell_type, drug, dose, method, n_true,
    n_control and the metrics of :func:`~genailab.perturb.evaluate.perturbation_metrics`.
    """
    counts = adata.X if layer is None else adata.layers[layer]
    check_expression(counts, counts=True, source="The benchmark's expression matrix")
    test = split.test_mask(adata.obs, keys)
    if test.all() or not test.any():
        raise ConfigError(f"The split holds out {int(test.sum())} of {test.size} cells; it must leave some on each side.")
    train = adata[~test].copy()
    methods = default_methods() if methods is None else list(methods)
    for method in methods:
        logger.info("fitting %s on %d training cells", method.name, train.n_obs)
        method.fit(train, keys=keys, layer=layer)
    pca = _fitted_pca(log_normalize(counts[np.flatnonzero(~test)]), n_comps, seed)

    groups = np.empty(adata.n_obs, dtype=object)
    groups[:] = cell_groups(adata.obs, keys)
    types, control = cell_types(adata.obs, keys), keys.is_control(adata.obs)
    rows = []
    for group in split.groups:
        cell_type, drug, dose = group
        true_rows = np.flatnonzero(test & np.array([g == group for g in groups]))
        if true_rows.size < min_cells:
            logger.info("skipping %s: %d held-out cells (< %d)", group, true_rows.size, min_cells)
            continue
        control_rows = np.flatnonzero(control & (types == cell_type))
        if control_rows.size < 2:
            raise InputDataError(
                f"Cell type {cell_type!r} has {control_rows.size} control cells; predictions need its control cells."
            )
        control_values, true_values = log_normalize(counts[control_rows]), log_normalize(counts[true_rows])
        for method in methods:
            predicted = method.predict(adata[control_rows], drug=drug, dose=dose)
            scores = perturbation_metrics(
                control_values, true_values, predicted, n_top_genes=n_top_genes, embed=pca.transform, seed=seed
            )
            rows.append(dict(protocol=split.protocol, cell_type=cell_type, drug=drug, dose=dose, method=method.name,
                             n_true=true_rows.size, n_control=control_rows.size, **scores))  # fmt: skip
    if not rows:
        raise InputDataError(f"No held-out group has {min_cells}+ cells to score; simulate or keep more cells.")
    return pd.DataFrame(rows)


def _fitted_pca(values: np.ndarray, n_comps: int, seed: int) -> PCA:
    rng = np.random.default_rng(seed)
    if values.shape[0] > _PCA_CELLS:
        values = values[rng.choice(values.shape[0], _PCA_CELLS, replace=False)]
    return PCA(n_components=min(n_comps, *values.shape), random_state=seed).fit(values)


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean of each metric over held-out groups, per protocol and method (methods in run order)."""
    summary = table.groupby(["protocol", "method"], sort=False)[list(METRICS)].mean()
    summary.insert(0, "groups", table.groupby(["protocol", "method"], sort=False).size())
    return summary


def format_table(summary: pd.DataFrame) -> str:
    """The summary as aligned text; higher R2 and lower energy are better."""
    return summary.to_string(float_format=lambda v: f"{v:.3f}")
