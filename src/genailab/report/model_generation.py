"""Generated cells of a fitted :class:`~genailab.VAE` against real ones.

* :func:`generate_like` (one prior draw per real cell, with its conditions and library size),
  scored by :func:`generation_fidelity` overall and per condition;
* posterior predictive checks: :func:`replicate_from_posterior` scored by
  :func:`posterior_predictive_check` (per-gene coefficient of variation and zero fraction);
* differential expression: :func:`log_fold_change` and :func:`de_agreement` (top-k overlap of
  real and generated contrasts between two groups).

As in :mod:`~genailab.report.model_metrics`, ``adata`` defaults to the training AnnData and
``indices`` to the model's validation cells.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from genailab.errors import ConfigError, InputDataError
from genailab.anndata_models.base import seeded
from genailab.data.preprocess import log_normalize
from genailab.anndata_models.vae import generated_anndata
from genailab.report._model_inputs import heldout_cells, observed
from genailab.eval.de import top_k_overlap
from genailab.eval.generation import (
    classifier_two_sample_auc,
    gene_moment_agreement,
    pca_distance,
    posterior_predictive_gene_stats,
)

_MIN_GROUP_CELLS = 10  # a condition needs this many real cells to be scored on its own
_NORMALISED_TOTAL = 1e4  # counts per cell before log1p in the distances and fold changes


def observed_libraries(model, adata: AnnData, indices: np.ndarray) -> np.ndarray | None:
    """Total counts of the cells at ``indices`` (n,), the library sizes their generated look-alikes
    take; None for a Gaussian model. An empty cell (total 0) is refused: nothing can be drawn at depth 0."""
    if not model.config.is_count_model:
        return None
    library = np.asarray(observed(model, adata, indices).sum(axis=1)).ravel()
    empty = np.flatnonzero(library <= 0)
    if empty.size:
        raise InputDataError(f"{empty.size} of the {indices.size} cells scored have zero total counts in the model's "
                             f"genes (first: {str(adata.obs_names[indices[empty[0]]])!r}), so no look-alike can be drawn "
                             "at their depth; remove them first, e.g. sc.pp.filter_cells(adata, min_counts=1).")  # fmt: skip
    return library


@torch.no_grad()
def generate_like(adata: AnnData, model, *, indices=None, seed: int = 0) -> AnnData:
    """One generated cell per real cell, from the prior, with the real cell's conditions and library.

    Cell ``i`` is ``x ~ p(x | z, c_i)`` with ``z ~ N(0, I)``, its conditions ``c_i`` and (count
    models) library size taken from real cell ``i``: generated and real cells then differ only in
    what the model learned, not in their mix of conditions or depths.

    Parameters
    ----------
    adata
        Real cells (the training AnnData for its validation cells).
    model
        A fitted :class:`~genailab.VAE`.
    indices
        Rows of ``adata``; default ``model.validation_indices``.
    seed
        Random state of the draws (the caller's random streams are left as they were).

    Returns
    -------
    AnnData
        Generated values in ``X`` (CSR counts for count models), the real cells' ``obs`` and the
        model's genes as ``var_names``.
    """
    adata, indices = heldout_cells(adata, model, indices=indices)
    obs = adata.obs.iloc[indices]
    library = observed_libraries(model, adata, indices)
    with seeded(seed):
        z = torch.randn(indices.size, model.config.latent_dim).numpy()
        values = model.decode(z, conditions=model.encode_conditions(obs), library=library, sample=True)
    return generated_anndata(model, values, obs, params={"source": "prior", "like": "real cells", "seed": seed})


@torch.no_grad()
def replicate_from_posterior(
    adata: AnnData, model, *, indices=None, n_draws: int = 1, seed: int = 0
) -> AnnData:
    """Replicated data for a posterior predictive check: ``x_rep ~ p(x | z, c)``, ``z ~ q(z | x, c)``.

    Each real cell is replicated ``n_draws`` times from its own posterior, at its observed library.

    Parameters
    ----------
    adata
        Real cells (the training AnnData for its validation cells).
    model
        A fitted :class:`~genailab.VAE`.
    indices
        Rows of ``adata``; default ``model.validation_indices``.
    n_draws
        Replicates per cell.
    seed
        Random state of the draws.

    Returns
    -------
    AnnData
        ``n_draws * n_cells`` rows (draw-major: all cells of draw 0, then draw 1, ...), the
        replicated values in ``X``, the real cells' ``obs`` repeated.
    """
    if n_draws < 1:
        raise ConfigError(f"n_draws must be positive, got {n_draws}.")
    adata, indices = heldout_cells(adata, model, indices=indices)
    draws = model.posterior_predictive_sample(adata, indices=indices, n_samples=n_draws, seed=seed)
    obs = adata.obs.iloc[np.tile(indices, n_draws)]
    return generated_anndata(model, draws.reshape(-1, draws.shape[-1]), obs,
                             params={"source": "posterior", "n_draws": n_draws, "seed": seed})  # fmt: skip


def posterior_predictive_check(
    adata: AnnData, model, *, indices=None, n_draws: int = 1, seed: int = 0
) -> dict:
    """Per-gene coefficient of variation and zero fraction of posterior replicates vs the observed data.

    A well-specified likelihood reproduces each gene's dispersion and zeros; an NB decoder on data
    with extra zeros under-predicts zero fractions, a Poisson-like fit under-predicts the CV.

    Parameters
    ----------
    adata
        Real cells (the training AnnData for its validation cells).
    model
        A fitted :class:`~genailab.VAE`.
    indices
        Rows of ``adata``; default ``model.validation_indices``.
    n_draws
        Posterior replicates per cell, stacked.
    seed
        Random state of the draws.

    Returns
    -------
    dict
        As :func:`~genailab.eval.posterior_predictive_gene_stats`: per-gene arrays and the summaries
        ``cv_pearson``, ``cv_mae``, ``zero_fraction_pearson``, ``zero_fraction_mae``.
    """
    adata, indices = heldout_cells(adata, model, indices=indices)
    replicated = replicate_from_posterior(adata, model, indices=indices, n_draws=n_draws, seed=seed)
    return posterior_predictive_gene_stats(observed(model, adata, indices), replicated.X)


def _log_normalised(model, matrix):
    """Log-normalised counts (count models, :func:`~genailab.data.preprocess.log_normalize`); Gaussian
    values are used as they are."""
    return log_normalize(matrix, target_sum=_NORMALISED_TOTAL) if model.config.is_count_model else matrix


def _fidelity(model, real, generated, *, n_comps: int, seed: int) -> dict[str, float]:
    scores = gene_moment_agreement(real, generated)
    real_log, generated_log = _log_normalised(model, real), _log_normalised(model, generated)
    n_comps = min(n_comps, real.shape[0] + generated.shape[0] - 1, real.shape[1] - 1)  # PCA needs fewer than both
    scores["energy_distance"] = pca_distance(real_log, generated_log, n_comps=n_comps, seed=seed)
    scores["classifier_auc"] = classifier_two_sample_auc(real_log, generated_log, n_comps=n_comps, seed=seed)
    scores["n_cells"] = int(real.shape[0])
    return scores


def generation_fidelity(
    adata: AnnData, model, *, indices=None, condition_key: str | None = None, n_comps: int = 20,
    seed: int = 0,
) -> dict:
    """Generated cells (:func:`generate_like`) against held-out real cells, overall and per condition.

    Per-gene statistics compare raw values; the energy distance and the classifier two-sample AUC
    compare log-normalised expression in a shared PCA space.

    Parameters
    ----------
    adata
        Real cells (the training AnnData for its validation cells).
    model
        A fitted :class:`~genailab.VAE`.
    indices
        Rows of ``adata``; default ``model.validation_indices``.
    condition_key
        A categorical condition of the model to score each category of separately (categories with
        fewer than 10 held-out cells are skipped); None scores all cells only.
    n_comps
        Principal components of the shared PCA; fewer (one below the cells or genes) on small data.
    seed
        Random state of the generation, the PCA and the classifier folds.

    Returns
    -------
    dict
        ``overall``: ``mean_pearson``, ``variance_pearson``, ``zero_fraction_pearson``,
        ``zero_fraction_mae``, ``energy_distance`` (0 = same distribution), ``classifier_auc``
        (0.5 = indistinguishable) and ``n_cells``; ``per_condition``: the same per category.
    """
    if condition_key is not None and condition_key not in model.schema.categorical_keys:
        raise ConfigError(
            f"condition_key={condition_key!r} is not a categorical condition of the model "
            f"({list(model.schema.categorical_keys)}); generated cells can only be matched to real ones "
            "by a condition the model was given."
        )
    adata, indices = heldout_cells(adata, model, indices=indices)
    real = observed(model, adata, indices)
    generated = generate_like(adata, model, indices=indices, seed=seed).X
    result = {"overall": _fidelity(model, real, generated, n_comps=n_comps, seed=seed), "per_condition": {}}
    if condition_key is not None:
        labels = adata.obs[condition_key].astype(str).to_numpy()[indices]
        for category in pd.unique(labels):
            rows = np.flatnonzero(labels == category)
            if rows.size >= _MIN_GROUP_CELLS:
                result["per_condition"][category] = _fidelity(
                    model, real[rows], generated[rows], n_comps=n_comps, seed=seed
                )
    return result


def log_fold_change(
    values, groups, *, group_a, group_b, counts: bool = True, pseudocount: float = 0.1
) -> np.ndarray:
    """Per-gene log2 fold change of mean expression, group A over group B.

    Counts are first scaled to 1e4 per cell; the fold change is
    ``log2((mean_A + pseudocount) / (mean_B + pseudocount))``. Non-count values (``counts=False``,
    already on a log scale) give the difference of means instead.

    Parameters
    ----------
    values
        Expression, (n_cells, n_genes): array or sparse matrix.
    groups
        Group of each cell, (n_cells,).
    group_a, group_b
        The two groups to contrast; each needs at least one cell.
    counts
        Whether ``values`` are counts (scaled and ratio of means) or log-scale values (difference).
    pseudocount
        Added to both means (per 1e4 counts) so genes absent from one group stay finite.

    Returns
    -------
    numpy.ndarray
        (n_genes,) fold changes; positive = higher in group A.

    Examples
    --------
    >>> log_fold_change(np.array([[4.0, 6.0], [1.0, 9.0]]), ["a", "b"], group_a="a", group_b="b", pseudocount=0)
    array([ 2.       , -0.5849625])
    """
    groups = np.asarray(groups)
    missing = pd.isna(groups)  # a missing group (NaN, None) is no group, not one called 'nan'
    groups = groups.astype(str)
    matrix = sp.csr_matrix(values, dtype=np.float64, copy=True) if sp.issparse(values) else np.asarray(values, dtype=np.float64)
    if groups.shape != (matrix.shape[0],):
        raise InputDataError(f"groups has shape {groups.shape}; give one group per cell ({matrix.shape[0]}).")
    means = []
    for group in (str(group_a), str(group_b)):
        rows = np.flatnonzero((groups == group) & ~missing)
        if rows.size == 0:
            present = sorted(set(groups[~missing]))
            raise InputDataError(f"group {group!r} has no cells; the groups present are {present}.")
        subset = matrix[rows]
        if counts:
            totals = np.asarray(subset.sum(axis=1)).ravel()
            subset = (sp.diags(_NORMALISED_TOTAL / np.maximum(totals, 1)) @ subset) if sp.issparse(subset) else (
                subset * (_NORMALISED_TOTAL / np.maximum(totals, 1))[:, None]
            )
        means.append(np.asarray(subset.mean(axis=0)).ravel())
    if not counts:
        return means[0] - means[1]
    return np.log2((means[0] + pseudocount) / (means[1] + pseudocount))


def de_agreement(
    adata: AnnData, model, *, group_key: str, group_a, group_b, k: int = 50, indices=None,
    source: str = "prior", seed: int = 0,
) -> dict:
    """Do generated cells reproduce the real differential expression between two groups?

    Computes :func:`log_fold_change` between ``group_a`` and ``group_b`` on the real cells and on
    their generated counterparts, then the share of top-``k`` genes by absolute fold change the two
    contrasts have in common (:func:`~genailab.eval.top_k_overlap`).

    Parameters
    ----------
    adata
        Real cells (the training AnnData for its validation cells).
    model
        A fitted :class:`~genailab.VAE`.
    group_key
        ``obs`` column holding the groups.
    group_a, group_b
        The two groups to contrast.
    k
        Top genes compared.
    indices
        Rows of ``adata``; default ``model.validation_indices``.
    source
        ``"prior"``: cells generated from the prior with each real cell's conditions
        (:func:`generate_like`); ``group_key`` must then be a categorical condition of the model.
        ``"posterior"``: each real cell replicated from its own posterior
        (:func:`replicate_from_posterior`), for groups the model was not told about.
    seed
        Random state of the generation.

    Returns
    -------
    dict
        ``top_k_overlap`` (in [0, 1]; about ``k / n_genes`` by chance), ``lfc_pearson``
        (correlation of the two fold-change vectors), ``k``, and the vectors ``lfc_real`` and
        ``lfc_generated``.
    """
    if source not in ("prior", "posterior"):
        raise ConfigError(f"source={source!r} is not 'prior' or 'posterior'.")
    if source == "prior" and group_key not in model.schema.categorical_keys:
        raise ConfigError(
            f"group_key={group_key!r} is not a categorical condition of the model, so cells generated from "
            "the prior carry no group; use source='posterior' to replicate each real cell instead."
        )
    adata, indices = heldout_cells(adata, model, indices=indices)
    if source == "prior":
        generated = generate_like(adata, model, indices=indices, seed=seed).X
    else:
        generated = replicate_from_posterior(adata, model, indices=indices, seed=seed).X
    groups = adata.obs[group_key].to_numpy()[indices]
    is_count = model.config.is_count_model
    contrast = {"group_a": group_a, "group_b": group_b, "counts": is_count}
    real_lfc = log_fold_change(observed(model, adata, indices), groups, **contrast)
    generated_lfc = log_fold_change(generated, groups, **contrast)
    return {
        "top_k_overlap": top_k_overlap(real_lfc, generated_lfc, k=k),
        "lfc_pearson": float(np.corrcoef(real_lfc, generated_lfc)[0, 1]),
        "k": k,
        "lfc_real": real_lfc,
        "lfc_generated": generated_lfc,
    }
