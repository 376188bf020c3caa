"""Compare the perturbation model with the baselines on held-out groups, in one run.

:func:`compare_methods` trains every method on the cells outside a :class:`HoldoutSplit`, predicts
each held-out group (cell type, drug, dose) from that cell type's control cells, and scores the
prediction against the held-out cells with :func:`~genailab.perturb.evaluate.perturbation_metrics`.
The true change is measured from the mean of reference controls
(:func:`~genailab.perturb.evaluate.reference_controls`, a third of each type's controls) that no
method trains on or predicts from, and each predicted change from the mean of the controls it was
predicted from, so that the truth shares no sampling error with any prediction (the module
docstring of :mod:`~genailab.perturb.evaluate` says why).
:func:`contrast` gives, per protocol and metric, the paired bootstrap 95% interval of
(ours - best baseline) over held-out groups: groups are drawn with replacement and each draw
averages the per-group differences of the two methods on the same groups. The best baseline is
the one with the best mean on that metric. (Resampling cells inside groups instead was tried and
dropped: R2 of resampled means is biased low, so its intervals missed the point difference.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from sklearn.decomposition import PCA

from genailab.anndata_models.perturbation import PerturbationModel
from genailab.data.perturbation_schema import ObsKeys
from genailab.data.validation import check_expression
from genailab.errors import ConfigError, InputDataError
from genailab.perturb.baselines import (
    AdditiveShift, LatentArithmetic, MatchingMean, NoChange, Oracle, PerturbedMean, RidgeCovariates, layer_values,
)  # fmt: skip
from genailab.perturb.evaluate import (
    HoldoutSplit, cell_groups, cell_types, centroid_accuracy, log_normalize, perturbation_metrics, reference_controls,
)  # fmt: skip

logger = logging.getLogger(__name__)

METRICS = (
    "r2_mean_top_de", "pearson_mean_top_de", "r2_delta", "pearson_delta", "r2_delta_top_de", "pearson_delta_top_de",
    "pearson_centred", "centroid_accuracy", "r2_delta_weighted", "direction_top_de", "energy",
)  # fmt: skip
CONTRASTED = ("r2_delta", "pearson_delta", "r2_delta_top_de", "pearson_delta_top_de", "energy")  # the targets
LOWER_IS_BETTER = ("energy",)
NOT_BASELINES = ("oracle", "genailab")  # rows that are not baselines when the best baseline is chosen
_PCA_CELLS = 3000  # training cells the PCA of the energy distance is fitted on


class CounterfactualVAE:
    """The :class:`~genailab.anndata_models.perturbation.PerturbationModel` as a benchmark method.

    Its prediction is ``layers['counterfactual']`` of ``predict``: each control cell's own counts
    moved by the model's fold change. With ``n_seeds > 1`` it is a seed ensemble: one model per
    seed, their log-normalised counterfactuals averaged cell by cell.
    """

    name = "genailab"

    def __init__(self, *, train_options: dict | None = None, n_seeds: int = 1, **model_options):
        self.train_options = dict(train_options or {})
        self.n_seeds = n_seeds
        self.model_options = model_options

    def fit(self, adata: AnnData, *, keys: ObsKeys, layer: str | None = None) -> CounterfactualVAE:
        seed = int(self.train_options.get("seed", 0))
        self.models = []
        for k in range(self.n_seeds):
            model = PerturbationModel(
                adata, drug_key=keys.drug, dose_key=keys.dose, cell_type_key=keys.cell_type,
                control_value=keys.control, layer=layer, **self.model_options,
            )  # fmt: skip
            self.models.append(model.fit(**{**self.train_options, "seed": seed + k}))
        return self

    def predict(self, control: AnnData, *, drug: str, dose: float) -> np.ndarray:
        draws = [
            log_normalize(m.predict(control, drug=drug, dose=dose, seed=k).layers["counterfactual"])
            for k, m in enumerate(self.models)
        ]
        return np.mean(draws, axis=0)


def default_methods(
    *,
    latent_dim: int = 10,
    hidden_dims: Sequence[int] | None = None,
    likelihood: str = "nb",
    train_options: dict | None = None,
    pairs: bool = False,
    true_log_fc: Callable[..., pd.DataFrame] | None = None,
) -> list:
    """The baselines, the model and (with ``true_log_fc``, see :class:`Oracle`) the oracle.

    Both neural methods share latent size, hidden layers (None: each class's default), likelihood
    (a count model) and training options. ``pairs`` adds Systema's matching mean, which differs
    from the additive baseline only for combinations.
    """
    shared: dict = dict(latent_dim=latent_dim, likelihood=likelihood, train_options=train_options)
    if hidden_dims is not None:
        shared["hidden_dims"] = tuple(hidden_dims)
    methods = [NoChange(), PerturbedMean(), AdditiveShift()]
    if pairs:
        methods.append(MatchingMean())
    methods += [RidgeCovariates(), LatentArithmetic(**shared), CounterfactualVAE(**shared)]
    if true_log_fc is not None:
        methods.append(Oracle(true_log_fc))
    return methods


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
    interacting_pairs: Sequence[str] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Train every method without the held-out groups and score its predictions of them.

    The reference controls (:func:`~genailab.perturb.evaluate.reference_controls` with ``seed``)
    are neither trained on nor given to any method: each method trains on the other cells and
    predicts from the other controls of the group's cell type; the true change is measured from
    the reference controls' mean, a predicted change from the mean of the controls it was made from.

    Parameters
    ----------
    adata
        Raw counts in ``layer`` (default ``"counts"``; None reads ``X``), drug/dose/cell-type
        columns named by ``keys``.
    split
        What to hold out (:func:`~genailab.perturb.evaluate.holdout_split`).
    keys
        The obs columns of drug, dose and cell type and the control label (:class:`ObsKeys`).
    layer
        The layer of raw counts (None: ``X``).
    methods
        Objects with ``name``, ``fit(adata, keys=, layer=)`` and ``predict(control, drug=, dose=)``;
        default :func:`default_methods`.
    min_cells
        Held-out groups with fewer cells are not scored (they stay out of training).
    interacting_pairs
        Pair labels whose effect is not the sum of their drugs'; under the ``pair`` protocol their
        groups are reported as ``pair (interacting)``, the others as ``pair (additive)``. Default
        ``adata.uns['interacting_pairs']`` (written by both genailab generators), else none.
    n_top_genes
        Genes with the largest true change behind the ``*_top_de`` metrics.
    n_comps
        Principal components (fitted on the training cells) of the energy distance.
    seed
        Seeds the reference controls, the PCA and the energy distance's subsampling.

    Returns
    -------
    One row per held-out group and method: protocol, group, cell_type, drug, dose, method,
    n_true, n_control (the prediction inputs), n_reference, the metrics (:data:`METRICS`) and
    ``r2_mean`` / ``pearson_mean`` (R2 and Pearson of the mean expression itself, not of its
    change; kept in the table, left out of :func:`summarize`).
    """
    counts = layer_values(adata, layer)
    check_expression(counts, counts=True, source="The benchmark's expression matrix")
    test = split.test_mask(adata.obs, keys)
    if test.all() or not test.any():
        raise ConfigError(f"The split holds out {int(test.sum())} of {test.size} cells; it must leave some on each side.")
    if interacting_pairs is None:
        interacting_pairs = [str(p) for p in adata.uns.get("interacting_pairs", [])]
    reference = reference_controls(adata.obs, keys=keys, seed=seed)
    used = ~test & ~reference
    train = adata[used].copy()
    methods = default_methods() if methods is None else list(methods)
    for method in methods:
        logger.info("fitting %s on %d training cells", method.name, train.n_obs)
        method.fit(train, keys=keys, layer=layer)
    train_values = log_normalize(counts[np.flatnonzero(used)])
    pca = _fitted_pca(train_values, n_comps, seed)
    perturbed_means = _perturbed_means(train_values, train.obs, keys)

    rows_of: dict = {}
    for i, group in enumerate(cell_groups(adata.obs, keys)):
        rows_of.setdefault(group, []).append(i)
    types, control = cell_types(adata.obs, keys), keys.is_control(adata.obs)
    rows, centroids = [], []
    for number, group in enumerate(split.groups):
        cell_type, drug, dose = group
        true_rows = np.asarray(rows_of.get(group, []), dtype=np.int64)
        if true_rows.size < min_cells:
            logger.info("skipping %s: %d held-out cells (< %d)", group, true_rows.size, min_cells)
            continue
        control_rows = np.flatnonzero(control & used & (types == cell_type))
        reference_rows = np.flatnonzero(control & reference & (types == cell_type))
        if min(control_rows.size, reference_rows.size) < 2:
            raise InputDataError(
                f"Cell type {cell_type!r} has {control_rows.size + reference_rows.size} control cells; the benchmark "
                "needs 2+ to predict from and 2+ as the reference of changes (a third): simulate or keep more controls."
            )
        protocol = split.protocol
        if protocol == "pair":
            protocol = "pair (interacting)" if drug in interacting_pairs else "pair (additive)"
        reference_values, true_values = log_normalize(counts[reference_rows]), log_normalize(counts[true_rows])
        input_values = log_normalize(counts[control_rows])
        predicted_means = {}
        for method in methods:
            predicted = method.predict(adata[control_rows], drug=drug, dose=dose)
            scores = perturbation_metrics(
                reference_values, true_values, predicted, predicted_from=input_values,
                perturbed_mean=perturbed_means.get(cell_type, perturbed_means[None]),
                n_top_genes=n_top_genes, embed=pca.transform, seed=seed,
            )  # fmt: skip
            rows.append(dict(protocol=protocol, group=number, cell_type=cell_type, drug=drug, dose=dose,
                             method=method.name, n_true=true_rows.size, n_control=control_rows.size,
                             n_reference=reference_rows.size, **scores))  # fmt: skip
            predicted_means[method.name] = predicted.mean(0)
        centroids.append((protocol, true_values.mean(0), predicted_means))
    if not rows:
        raise InputDataError(f"No held-out group has {min_cells}+ cells to score; simulate or keep more cells.")
    scores = pd.DataFrame(rows)
    scores["centroid_accuracy"] = _centroid_column(scores, centroids)
    return scores


def _perturbed_means(values: np.ndarray, obs: pd.DataFrame, keys: ObsKeys) -> dict:
    """Systema's perturbed mean of each cell type's treated training cells (log-normalised), and
    under None that of all of them, for a type with no treated training cell (as
    :class:`~genailab.perturb.baselines.PerturbedMean` predicts). Centring on the mean over every
    type measured cell-type identity: no change scored a centred Pearson of 0.87."""
    treated = ~keys.is_control(obs)
    types = cell_types(obs, keys)
    means = {None: values[treated].mean(0)}
    for cell_type in np.unique(types[treated]):
        means[cell_type] = values[treated & (types == cell_type)].mean(0)
    return means


def _fitted_pca(values: np.ndarray, n_comps: int, seed: int) -> PCA:
    rng = np.random.default_rng(seed)
    if values.shape[0] > _PCA_CELLS:
        values = values[rng.choice(values.shape[0], _PCA_CELLS, replace=False)]
    return PCA(n_components=min(n_comps, *values.shape), random_state=seed).fit(values)


def _centroid_column(scores: pd.DataFrame, centroids: list) -> np.ndarray:
    """Centroid accuracy of each row, among the scored groups of the same protocol label."""
    out = np.full(len(scores), np.nan)
    methods = list(dict.fromkeys(scores["method"]))
    for protocol in dict.fromkeys(p for p, _, _ in centroids):
        chosen = [(t, p) for label, t, p in centroids if label == protocol]
        true = np.stack([t for t, _ in chosen])
        for method in methods:
            accuracy = centroid_accuracy(np.stack([p[method] for _, p in chosen]), true)
            rows = np.flatnonzero(((scores["protocol"] == protocol) & (scores["method"] == method)).to_numpy())
            out[rows] = accuracy
    return out


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean of each metric over held-out groups, per protocol and method (methods in run order)."""
    by = table.groupby(["protocol", "method"], sort=False)
    summary = by[list(METRICS)].mean()
    summary.insert(0, "groups", by.size())
    return summary


def contrast(table: pd.DataFrame, *, ours: str = "genailab", n_bootstrap: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per protocol and metric of :data:`CONTRASTED`: our mean, the best baseline's, and the paired
    bootstrap 95% interval of (ours - best) over held-out groups (percentiles of the draws).

    The groups are resampled as if independent and the best baseline is the one with the best mean
    on these same groups, fixed inside the draws. Groups that share a held-out (cell type, drug)
    are not independent, and resampling those units instead gives wider intervals, so read these
    as optimistic."""
    rng = np.random.default_rng(seed)
    rows = []
    for protocol, block in table.groupby("protocol", sort=False):
        wide = {metric: block.pivot(index="group", columns="method", values=metric) for metric in CONTRASTED}
        methods = list(dict.fromkeys(block["method"]))
        baselines = [m for m in methods if m not in NOT_BASELINES and m != ours]
        if ours not in methods or not baselines:
            continue
        for metric, values in wide.items():
            means = values.mean()
            best = means[baselines].idxmin() if metric in LOWER_IS_BETTER else means[baselines].idxmax()
            difference = (values[ours] - values[best]).dropna().to_numpy()
            draws = rng.choice(difference, size=(n_bootstrap, difference.size)).mean(1)
            low, high = np.percentile(draws, [2.5, 97.5])
            rows.append(dict(protocol=protocol, metric=metric, ours=means[ours], best_baseline=best,
                             best=means[best], low=low, high=high))  # fmt: skip
    return pd.DataFrame(rows, columns=["protocol", "metric", "ours", "best_baseline", "best", "low", "high"])


_SHORT = {
    "r2_mean_top_de": "R2 mean50", "pearson_mean_top_de": "r mean50", "r2_delta": "R2 d", "pearson_delta": "r d",
    "r2_delta_top_de": "R2 d50", "pearson_delta_top_de": "r d50", "pearson_centred": "r centred",
    "centroid_accuracy": "centroid", "r2_delta_weighted": "wR2 d", "direction_top_de": "dir50", "energy": "energy",
}  # fmt: skip


def format_table(table: pd.DataFrame, *, ours: str = "genailab") -> str:
    """Per protocol: every method's mean scores, then ours - best baseline with its 95% interval.

    Column names: ``d`` change from control, ``50`` the top-50 DE genes, ``R2``/``r`` R2 and
    Pearson; higher is better except energy.
    """
    summary, differences = summarize(table), contrast(table, ours=ours)
    blocks = []
    for protocol in dict.fromkeys(summary.index.get_level_values(0)):
        block = summary.loc[protocol].rename(columns=_SHORT)
        lines = [f"== {protocol} ({int(block['groups'].iloc[0])} groups)",
                 block.drop(columns="groups").to_string(float_format=lambda v: f"{v:.3f}")]  # fmt: skip
        for row in differences[differences["protocol"] == protocol].itertuples():
            interval = f" [{row.low:+.3f}, {row.high:+.3f}]"
            lines.append(f"  {_SHORT[row.metric]:>6}: {ours} - {row.best_baseline} = {row.ours - row.best:+.3f}{interval}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
