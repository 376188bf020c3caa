"""Data augmentation: generate cells for given conditions, and measure how real they look."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from genailab.apps._anndata import model_counts, require_in_memory
from genailab.data.preprocess import log_normalize
from genailab.data.schema import category_label, category_labels
from genailab.anndata_models.vae import generated_anndata
from genailab.checks import check_library_size, check_number
from genailab.errors import ConfigError, InputDataError
from genailab.eval._inputs import matched_by_name
from genailab.data.validation import is_integer_counts

SOURCES = ("prior", "posterior")


def generate(
    adata: AnnData | None,
    model,
    *,
    n_cells: int,
    conditions: Mapping[str, object] | None = None,
    source: str = "prior",
    library_size: float | None = None,
    seed: int = 0,
) -> AnnData:
    """Generate ``n_cells`` cells: z from the prior or a condition's aggregate posterior, then x ~ p(x|z,c).

    With ``source="prior"``, z ~ N(0, I). With ``source="posterior"``, each new cell picks a real
    cell of ``adata`` whose ``obs`` matches ``conditions`` (categorical ones) and draws z from that
    cell's posterior q(z|x,c): a sample of the aggregate posterior of the condition, which stays
    closer to the real cells when the prior and the aggregate posterior disagree.

    Parameters
    ----------
    adata
        Real cells: the source of posterior latents and of library sizes (cells with no counts
        over the model's genes are never drawn). May be None with
        ``source="prior"``, then every condition must be given and ``library_size`` defaults to
        the training median.
    model
        A trained count :class:`~genailab.VAE`.
    n_cells
        Cells to generate.
    conditions
        ``{obs column: value}`` for the generated cells (e.g. ``{"cell_type": "B"}``). Conditions of
        the model left out are copied from the real cells drawn (posterior, or prior with ``adata``).
        With ``source="posterior"`` a column need not be a condition of the model: it then only
        selects the real cells (e.g. a cell type, from a model conditioned on batch alone).
    source
        ``"prior"`` or ``"posterior"``.
    library_size
        Total count of every generated cell; None resamples the totals of the matching real cells.
    seed
        Seeds the latent draws, the choice of real cells and the count sampling.

    Returns
    -------
    A new AnnData: sampled counts in ``X`` (CSR float32), the model's genes as ``var_names``, every
    condition of the model in ``obs`` (plus ``obs['source_cell']``, the real cell behind each new
    one, when real cells were used) and ``uns['genailab_generate']['params']``.

    Examples
    --------
    >>> rare = generate(adata, model, n_cells=200, conditions={"cell_type": "B"}, source="posterior")  # doctest: +SKIP
    >>> augmented = anndata.concat([adata, rare])  # doctest: +SKIP
    """
    if source not in SOURCES:
        raise ConfigError(f"source={source!r} is not one of {SOURCES}.")
    n_cells = check_number("n_cells", n_cells, integer=True, ge=1)
    library_size = check_library_size(library_size, allow_none=True)
    seed = check_number("seed", seed, integer=True, ge=0)
    if adata is None and source == "posterior":
        raise ConfigError("source='posterior' encodes real cells; pass the AnnData they are in.")
    if adata is not None:
        require_in_memory(adata, "generate")
    conditions = dict(conditions or {})
    model_keys = set(model.schema.categorical_keys + model.schema.continuous_keys)
    selecting_only = sorted(set(conditions) - model_keys)
    if selecting_only and source == "prior":
        raise ConfigError(
            f"{selecting_only} are not conditions of the model, so prior draws cannot follow them; use "
            "source='posterior' to draw from the latents of the real cells with those values."
        )
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if adata is None:
            obs = pd.DataFrame(index=range(n_cells))
            z = rng.standard_normal((n_cells, model.config.latent_dim))
            library = np.full(n_cells, float(library_size or model.default_library))
        else:
            real = _matching_cells(adata, conditions, model.schema.continuous_keys)
            totals = np.asarray(model_counts(real, model).sum(axis=1)).ravel()
            if not (totals > 0).any():
                raise InputDataError(f"The {real.n_obs} cells to draw from have no counts over the model's genes, so "
                                     "they give no library size; pass cells with counts.")  # fmt: skip
            real, totals = real[totals > 0], totals[totals > 0]  # an empty cell has no library to resample
            rows = np.sort(rng.integers(real.n_obs, size=n_cells))
            picked = real[rows]
            obs = picked.obs.reset_index(names="source_cell")
            library = totals[rows]
            if library_size is not None:
                library = np.full(n_cells, float(library_size))
            if source == "posterior":
                z = model.get_latent(picked, n_samples=1, seed=None)[0]  # from the seeded stream above
            else:
                z = rng.standard_normal((n_cells, model.config.latent_dim))
        c = model.encode_conditions(obs, {k: v for k, v in conditions.items() if k in model_keys})
        counts = model.decode(z, conditions=c, library=library, sample=True)
    return _as_anndata(model, counts, obs, conditions, source_cells=adata is not None, params=dict(
        n_cells=n_cells, conditions=conditions, source=source, library_size=library_size, seed=seed))  # fmt: skip


def _matching_cells(adata: AnnData, conditions: Mapping[str, object], continuous_keys=()) -> AnnData:
    """The cells of ``adata`` whose ``obs`` columns equal the given conditions (as text, so a
    numeric-coded donor 1 matches 1), except the model's ``continuous_keys``, which are set, not matched."""
    keep = np.ones(adata.n_obs, dtype=bool)
    for key, value in conditions.items():
        if key not in adata.obs:
            raise InputDataError(f"obs has no column {key!r}; the conditions must be obs columns of the real cells.")
        column = adata.obs[key]
        if key in continuous_keys:
            continue  # continuous conditions (dose) are set, not matched
        keep &= category_labels(column) == category_label(value)
    if not keep.any():
        raise InputDataError(f"No cell of the AnnData matches {dict(conditions)}; check the values against obs.")
    return adata[keep]


def _as_anndata(model, counts, obs, conditions, *, source_cells: bool, params: dict) -> AnnData:
    schema = model.schema
    out_obs = pd.DataFrame(index=[f"generated_{i}" for i in range(counts.shape[0])])
    for key in schema.continuous_keys:
        out_obs[key] = np.asarray(conditions[key] if key in conditions else obs[key], dtype=np.float64)
    for key, categories in zip(schema.categorical_keys, schema.categories):
        values = np.repeat(category_label(conditions[key]), len(out_obs)) if key in conditions else category_labels(obs[key])
        out_obs[key] = pd.Categorical(values, categories=list(categories))
    for key in sorted(set(conditions) - set(out_obs.columns)):  # columns that only selected the real cells
        out_obs[key] = pd.Categorical(np.repeat(category_label(conditions[key]), len(out_obs)))
    if source_cells:
        out_obs["source_cell"] = obs["source_cell"].astype(str).to_numpy()
    return generated_anndata(model, counts, out_obs, params=params)


def generated_vs_real(
    real, generated, *, layer: str | None = None, n_comps: int = 20, n_folds: int = 5, seed: int = 0
) -> dict[str, float]:
    """How close generated counts are to real counts of the same condition (:mod:`genailab.eval`).

    For cells from :func:`generate` (any source, any real cells); :func:`genailab.report.generation_fidelity`
    scores a model's own prior draws against its validation cells.

    Per-gene moments are compared on the counts; the distances and the classifier two-sample test
    on log-normalised counts (``log1p`` counts per 10k) in a PCA shared by both samples.

    Parameters
    ----------
    real, generated
        Counts (arrays, sparse matrices or AnnData) over the same genes. Two AnnData (or
        DataFrames) are matched by gene name, and genes that differ are refused; arrays are taken
        in the same gene order.
    layer
        ``layers`` key of the counts of ``real`` when it is an AnnData (e.g. ``"counts"`` when its
        ``X`` holds log-normalised values); default ``X``. ``generated`` is read from ``X``, where
        :func:`generate` writes its counts.
    n_comps
        Principal components for the distances and the classifier (capped by the data size).
    n_folds
        Cross-validation folds of the classifier; each sample needs at least this many cells
        (lower it for a rare type of a few cells).
    seed
        Random state of the PCA, subsampling and cross-validation.

    Returns
    -------
    dict
        ``mean_pearson``, ``variance_pearson``, ``zero_fraction_pearson``, ``zero_fraction_mae``
        (:func:`~genailab.eval.gene_moment_agreement`), ``energy_distance`` and ``mmd``
        (:func:`~genailab.eval.pca_distance`, 0 = same distribution) and ``classifier_auc``
        (:func:`~genailab.eval.classifier_two_sample_auc`, 0.5 = indistinguishable).
    """
    from genailab.eval import classifier_two_sample_auc, gene_moment_agreement, pca_distance

    check_number("n_folds", n_folds, integer=True, ge=2)
    generated = matched_by_name(real, generated, names=("real", "generated"))
    real, generated = _counts(real, layer, "real"), _counts(generated, None, "generated")
    scores = gene_moment_agreement(real, generated)
    real_log, generated_log = log_normalize(real), log_normalize(generated)
    check_number("n_comps", n_comps, integer=True, ge=1)
    if real.shape[1] < 2:
        raise InputDataError(f"real has {real.shape[1]} gene(s); the distances and the classifier compare cells in "
                             "principal components, which need at least 2 genes.")
    n_comps = min(n_comps, real.shape[0] + generated.shape[0] - 1, real.shape[1] - 1)
    for name, metric in (("energy_distance", "energy"), ("mmd", "mmd")):
        scores[name] = pca_distance(real_log, generated_log, n_comps=n_comps, metric=metric, seed=seed)
    scores["classifier_auc"] = classifier_two_sample_auc(real_log, generated_log, n_comps=n_comps, n_folds=n_folds,
                                                         seed=seed)  # fmt: skip
    return scores


def _counts(data, layer: str | None, name: str):
    """The counts of one input to :func:`generated_vs_real`: an AnnData's ``layers[layer]`` (or
    ``X``), refused unless whole non-negative numbers (log-normalised values would pass for counts)."""
    if isinstance(data, AnnData):
        if layer is not None and layer not in data.layers:
            raise InputDataError(f"{name} has no layers[{layer!r}] (given as `layer`); its layers: "
                                 f"{list(data.layers.keys())}.", argument="layer")  # fmt: skip
        data = data.X if layer is None else data.layers[layer]
    matrix = data.to_numpy() if isinstance(data, pd.DataFrame) else data
    if not is_integer_counts(matrix if sp.issparse(matrix) else np.asarray(matrix)):
        hint = " (for an AnnData with log-normalised X, pass layer='counts' or wherever its counts are)"
        raise InputDataError(f"{name} is not raw counts (whole numbers >= 0): generated_vs_real compares "
                             f"counts{hint}.")
    return matrix
