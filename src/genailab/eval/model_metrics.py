"""Metrics of a fitted :class:`~genailab.VAE` on held-out cells.

* likelihood: :func:`validation_elbo` (negative ELBO and its terms), :func:`heldout_marginal_ll`
  (importance-sampled log p(x|c), the IWAE bound), :func:`reconstruction_error`;
* generated cells: :func:`generate_like` (one prior draw per real cell, with its conditions and
  library size) scored by :func:`generation_fidelity` overall and per condition;
* posterior predictive checks: :func:`replicate_from_posterior` scored by
  :func:`posterior_predictive_check` (per-gene coefficient of variation and zero fraction);
* differential expression: :func:`log_fold_change` and :func:`de_agreement` (top-k overlap of
  real and generated contrasts between two groups).

Every function takes ``(model, adata=None, *, indices=None, ...)``: ``adata`` defaults to the
model's training AnnData and ``indices`` to the model's validation cells
(``model.validation_indices``, never used for gradient steps), so the defaults score held-out
cells. Pass ``indices=np.arange(adata.n_obs)`` to score every cell of another AnnData.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from genailab.data.backed import minibatch_loader
from genailab.errors import ConfigError, InputDataError
from genailab.eval.de import top_k_overlap
from genailab.eval.generation import (
    classifier_two_sample_auc,
    gene_moment_agreement,
    pca_distance,
    posterior_predictive_gene_stats,
)
from genailab.train.trainer import evaluate

_BATCH = 512
_MIN_GROUP_CELLS = 10  # a condition needs this many real cells to be scored on its own
_NORMALISED_TOTAL = 1e4  # counts per cell before log1p in the distances and fold changes


def heldout_cells(model, adata: AnnData | None = None, *, indices=None) -> tuple[AnnData, np.ndarray]:
    """The AnnData and row indices a metric scores: by default the model's validation cells."""
    if adata is None:
        adata = model.adata
        if adata is None:
            raise ConfigError("The model was loaded without an AnnData; pass adata=... explicitly.")
    if indices is None:
        indices = model.validation_indices
        if indices.size == 0:
            raise ConfigError(
                "The model was trained with validation_fraction=0, so it has no held-out cells; "
                "pass indices=... (rows of adata) to choose the cells to score."
            )
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1 or indices.size == 0 or indices.min() < 0 or indices.max() >= adata.n_obs:
        raise InputDataError(
            f"indices must be a non-empty 1-D array of rows of adata (0..{adata.n_obs - 1}); the model's "
            "validation indices refer to its training AnnData, so pass indices=... for other data."
        )
    return adata, indices


def _batches(model, adata: AnnData, indices: np.ndarray):
    """Minibatches of the chosen cells in order, on the model's device."""
    matrix = model.schema.expression(adata)
    conditions = model.schema.encode_obs(adata.obs)
    device = next(model.module.parameters()).device
    for batch in minibatch_loader(matrix, conditions, indices=indices, batch_size=_BATCH, shuffle=False):
        yield batch.to(device)


def _counts(model, adata: AnnData, indices: np.ndarray) -> sp.csr_matrix | np.ndarray:
    """The modelled values (layer) of the chosen cells: CSR float64 for count models, else dense."""
    rows = [batch.x.cpu().numpy().astype(np.float64) for batch in _batches(model, adata, indices)]
    return sp.csr_matrix(np.concatenate(rows)) if model.config.is_count_model else np.concatenate(rows)


@contextlib.contextmanager
def _seeded(model, seed: int):
    """Seed torch's generators for the model's sampling, leaving the caller's random streams as they were."""
    device = next(model.module.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def validation_elbo(model, adata: AnnData | None = None, *, indices=None, seed: int = 0) -> dict[str, float]:
    """Negative ELBO per cell on held-out cells, with its two terms (KL weight 1, one sample of z).

    The same quantity as the ``val_elbo_loss`` column of ``model.history`` once KL warm-up has
    ended. Lower is better.

    Parameters
    ----------
    model
        A fitted :class:`~genailab.VAE`.
    adata
        Cells to score; default the training AnnData.
    indices
        Rows of ``adata`` to score; default ``model.validation_indices``.
    seed
        Random state of the single posterior sample.

    Returns
    -------
    dict
        ``reconstruction`` (mean over cells of -log p(x|z,c)), ``kl`` (mean KL(q(z|x,c) || p(z))),
        ``negative_elbo`` (their sum) and ``n_cells``.
    """
    adata, indices = heldout_cells(model, adata, indices=indices)
    with _seeded(model, seed):
        terms = evaluate(model.module, _batches(model, adata, indices))
    return {
        "reconstruction": terms["reconstruction"],
        "kl": terms["kl"],
        "negative_elbo": terms["elbo_loss"],
        "n_cells": int(indices.size),
    }


def heldout_marginal_ll(
    model, adata: AnnData | None = None, *, n_samples: int = 100, indices=None, seed: int = 0
) -> dict:
    """Held-out log-likelihood log p(x|c) per cell by importance sampling (IWAE bound, K samples).

    A lower bound that tightens as ``n_samples`` grows (K = 1 is the ELBO); higher is better.
    Compare models on the same cells with the same K.

    Parameters
    ----------
    model
        A fitted :class:`~genailab.VAE`.
    adata
        Cells to score; default the training AnnData.
    n_samples
        Importance samples K per cell.
    indices
        Rows of ``adata``; default ``model.validation_indices``.
    seed
        Random state of the importance samples.

    Returns
    -------
    dict
        ``mean`` (float, per cell), ``per_cell`` ((n_cells,) array), ``n_samples`` and ``n_cells``.
    """
    adata, indices = heldout_cells(model, adata, indices=indices)
    with _seeded(model, seed):
        per_cell = model.get_marginal_ll(adata, n_samples=n_samples, indices=indices)
    return {"mean": float(per_cell.mean()), "per_cell": per_cell, "n_samples": n_samples, "n_cells": int(indices.size)}


@torch.no_grad()
def reconstruction_error(model, adata: AnnData | None = None, *, indices=None) -> dict[str, float]:
    """How well each cell is reconstructed from its posterior mean, deterministically.

    Parameters
    ----------
    model
        A fitted :class:`~genailab.VAE`.
    adata
        Cells to score; default the training AnnData.
    indices
        Rows of ``adata``; default ``model.validation_indices``.

    Returns
    -------
    dict
        ``nll``: mean over cells of -log p(x | z = E[z|x,c], c), summed over genes (count models
        at the cell's observed library size); ``mse``: mean over cells and genes of the squared
        difference between the observed and expected values, on the log1p scale for count models
        (``log1p(x)`` vs ``log1p(E[x|z,c])``) and as is for the Gaussian model; ``n_cells``.
    """
    adata, indices = heldout_cells(model, adata, indices=indices)
    module = model.module.eval()
    is_count = model.config.is_count_model
    nll, squared, n_cells = 0.0, 0.0, 0
    for batch in _batches(model, adata, indices):
        x, c = batch.x, batch.c
        mean, _ = module.encode(x, c)
        library = x.sum(1, keepdim=True) if is_count else None
        nll += float(-module.decode(mean, c, library).log_prob(x).sum())
        expected = module.expected_expression(mean, c, library)
        difference = (torch.log1p(x) - torch.log1p(expected)) if is_count else (x - expected)
        squared += float(difference.double().pow(2).sum())
        n_cells += x.shape[0]
    return {"nll": nll / n_cells, "mse": squared / (n_cells * model.config.input_dim), "n_cells": n_cells}


@torch.no_grad()
def generate_like(model, adata: AnnData | None = None, *, indices=None, seed: int = 0) -> AnnData:
    """One generated cell per real cell, from the prior, with the real cell's conditions and library.

    Cell ``i`` is ``x ~ p(x | z, c_i)`` with ``z ~ N(0, I)``, its conditions ``c_i`` and (count
    models) library size taken from real cell ``i``: generated and real cells then differ only in
    what the model learned, not in their mix of conditions or depths.

    Returns
    -------
    AnnData
        Generated values in ``X`` (CSR counts for count models), the real cells' ``obs`` and the
        model's genes as ``var_names``.
    """
    adata, indices = heldout_cells(model, adata, indices=indices)
    module = model.module.eval()
    generated = []
    with _seeded(model, seed):
        for batch in _batches(model, adata, indices):
            library = batch.x.sum(1, keepdim=True) if model.config.is_count_model else None
            generated.append(module.sample(batch.x.shape[0], batch.c, library=library).cpu().numpy())
    return _as_anndata(model, np.concatenate(generated), adata.obs.iloc[indices])


@torch.no_grad()
def replicate_from_posterior(
    model, adata: AnnData | None = None, *, indices=None, n_draws: int = 1, seed: int = 0
) -> AnnData:
    """Replicated data for a posterior predictive check: ``x_rep ~ p(x | z, c)``, ``z ~ q(z | x, c)``.

    Each real cell is replicated ``n_draws`` times from its own posterior, at its observed library.

    Returns
    -------
    AnnData
        ``n_draws * n_cells`` rows (draw-major: all cells of draw 0, then draw 1, ...), the
        replicated values in ``X``, the real cells' ``obs`` repeated.
    """
    if n_draws < 1:
        raise ConfigError(f"n_draws must be positive, got {n_draws}.")
    adata, indices = heldout_cells(model, adata, indices=indices)
    module = model.module.eval()
    draws = []
    with _seeded(model, seed):
        for _ in range(n_draws):
            for batch in _batches(model, adata, indices):
                draws.append(module(batch.x, batch.c).px.sample().cpu().numpy())  # z ~ q, observed library
    obs = adata.obs.iloc[np.tile(indices, n_draws)]
    return _as_anndata(model, np.concatenate(draws), obs)


def _as_anndata(model, values: np.ndarray, obs: pd.DataFrame) -> AnnData:
    values = values.astype(np.float32)
    obs = obs.copy()
    obs.index = [f"generated_{i}" for i in range(obs.shape[0])]
    result = AnnData(X=sp.csr_matrix(values) if model.config.is_count_model else values, obs=obs)
    result.var_names = list(model.schema.gene_names)
    return result


def posterior_predictive_check(
    model, adata: AnnData | None = None, *, indices=None, n_draws: int = 1, seed: int = 0
) -> dict:
    """Per-gene coefficient of variation and zero fraction of posterior replicates vs the observed data.

    A well-specified likelihood reproduces each gene's dispersion and zeros; an NB decoder on data
    with extra zeros under-predicts zero fractions, a Poisson-like fit under-predicts the CV.

    Returns
    -------
    dict
        As :func:`~genailab.eval.posterior_predictive_gene_stats`: per-gene arrays and the summaries
        ``cv_pearson``, ``cv_mae``, ``zero_fraction_pearson``, ``zero_fraction_mae``.
    """
    adata, indices = heldout_cells(model, adata, indices=indices)
    replicated = replicate_from_posterior(model, adata, indices=indices, n_draws=n_draws, seed=seed)
    return posterior_predictive_gene_stats(_counts(model, adata, indices), replicated.X)


def _log_normalised(model, matrix):
    """log1p of counts scaled to 1e4 per cell (count models); Gaussian values are used as they are."""
    if not model.config.is_count_model:
        return matrix
    matrix = sp.csr_matrix(matrix, dtype=np.float64)
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    scaled = sp.diags(_NORMALISED_TOTAL / np.maximum(totals, 1)) @ matrix
    return scaled.log1p()


def _fidelity(model, real, generated, *, n_comps: int, seed: int) -> dict[str, float]:
    scores = gene_moment_agreement(real, generated)
    real_log, generated_log = _log_normalised(model, real), _log_normalised(model, generated)
    n_comps = min(n_comps, real.shape[0] + generated.shape[0] - 1, real.shape[1])
    scores["energy_distance"] = pca_distance(real_log, generated_log, n_comps=n_comps, seed=seed)
    scores["classifier_auc"] = classifier_two_sample_auc(real_log, generated_log, n_comps=n_comps, seed=seed)
    scores["n_cells"] = int(real.shape[0])
    return scores


def generation_fidelity(
    model, adata: AnnData | None = None, *, indices=None, condition_key: str | None = None, n_comps: int = 20,
    seed: int = 0,
) -> dict:
    """Generated cells (:func:`generate_like`) against held-out real cells, overall and per condition.

    Per-gene statistics compare raw values; the energy distance and the classifier two-sample AUC
    compare log-normalised expression in a shared PCA space.

    Parameters
    ----------
    model
        A fitted :class:`~genailab.VAE`.
    adata
        Real cells; default the training AnnData.
    indices
        Rows of ``adata``; default ``model.validation_indices``.
    condition_key
        A categorical condition of the model to score each category of separately (categories with
        fewer than 10 held-out cells are skipped); None scores all cells only.
    n_comps
        Principal components of the shared PCA.
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
    adata, indices = heldout_cells(model, adata, indices=indices)
    real = _counts(model, adata, indices)
    generated = generate_like(model, adata, indices=indices, seed=seed).X
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


def log_fold_change(values, groups, group_a, group_b, *, counts: bool = True, pseudocount: float = 0.1) -> np.ndarray:
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
    >>> log_fold_change(np.array([[4.0, 6.0], [1.0, 9.0]]), ["a", "b"], "a", "b", pseudocount=0)
    array([ 2.       , -0.5849625])
    """
    groups = np.asarray(groups).astype(str)
    matrix = sp.csr_matrix(values, dtype=np.float64) if sp.issparse(values) else np.asarray(values, dtype=np.float64)
    if groups.shape != (matrix.shape[0],):
        raise InputDataError(f"groups has shape {groups.shape}; give one group per cell ({matrix.shape[0]}).")
    means = []
    for group in (str(group_a), str(group_b)):
        rows = np.flatnonzero(groups == group)
        if rows.size == 0:
            raise InputDataError(f"group {group!r} has no cells; the groups present are {sorted(set(groups))}.")
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
    model, adata: AnnData | None = None, *, group_key: str, group_a, group_b, k: int = 50, indices=None,
    source: str = "prior", seed: int = 0,
) -> dict:
    """Do generated cells reproduce the real differential expression between two groups?

    Computes :func:`log_fold_change` between ``group_a`` and ``group_b`` on the real cells and on
    their generated counterparts, then the share of top-``k`` genes by absolute fold change the two
    contrasts have in common (:func:`~genailab.eval.top_k_overlap`).

    Parameters
    ----------
    model
        A fitted :class:`~genailab.VAE`.
    adata
        Real cells; default the training AnnData.
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
    adata, indices = heldout_cells(model, adata, indices=indices)
    if source == "prior":
        generated = generate_like(model, adata, indices=indices, seed=seed).X
    else:
        generated = replicate_from_posterior(model, adata, indices=indices, seed=seed).X
    groups = adata.obs[group_key].to_numpy()[indices]
    is_count = model.config.is_count_model
    real_lfc = log_fold_change(_counts(model, adata, indices), groups, group_a, group_b, counts=is_count)
    generated_lfc = log_fold_change(generated, groups, group_a, group_b, counts=is_count)
    return {
        "top_k_overlap": top_k_overlap(real_lfc, generated_lfc, k=k),
        "lfc_pearson": float(np.corrcoef(real_lfc, generated_lfc)[0, 1]),
        "k": k,
        "lfc_real": real_lfc,
        "lfc_generated": generated_lfc,
    }
