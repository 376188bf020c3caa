"""How close generated (or model-replicated) expression is to real expression.

Two families, each model-independent (they see matrices only):

* per-gene summaries: :func:`gene_moment_agreement` (means, variances, zero fractions) and
  :func:`posterior_predictive_gene_stats` (coefficient of variation and zero fraction of data
  replicated from a fitted model against the data it was fitted to);
* two-sample distances between cells: :func:`mmd_rbf`, :func:`energy_distance`, both usually
  applied in a shared PCA space through :func:`pca_distance`, and the classifier two-sample test
  :func:`classifier_two_sample_auc`.

:func:`per_condition` runs any of them separately for each condition (cell type, drug, ...).
Inputs are numpy arrays, scipy sparse matrices or AnnData (``.X``), cells in rows. Pass the scale
you want compared: log-normalised expression suits the distances, whose PCA is otherwise dominated
by a few highly expressed genes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial.distance import cdist, pdist
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from genailab.errors import ConfigError, InputDataError
from genailab.eval._inputs import as_dense, as_labels, as_matrix, matched_by_name, same_features

logger = logging.getLogger(__name__)


def _gene_stats(matrix: np.ndarray | sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-gene mean, variance (ddof=1, nan for one cell) and zero fraction, each (n_genes,).

    Sparse input stays sparse.
    """
    n_cells = matrix.shape[0]
    mean = np.asarray(matrix.mean(axis=0)).ravel()
    squares = matrix.multiply(matrix) if sp.issparse(matrix) else matrix**2
    second_moment = np.asarray(squares.mean(axis=0)).ravel()
    if n_cells > 1:
        variance = np.maximum(second_moment - mean**2, 0) * n_cells / (n_cells - 1)
    else:
        variance = np.full_like(mean, np.nan)
    zero_fraction = 1 - np.asarray((matrix != 0).sum(axis=0)).ravel() / n_cells
    return mean, variance, zero_fraction


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation over entries finite in both; nan when either side is constant."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep] - x[keep].mean(), y[keep] - y[keep].mean()
    denominator = np.sqrt(np.sum(x**2) * np.sum(y**2))
    return float(np.sum(x * y) / denominator) if denominator > 0 else float("nan")


def _mean_abs_error(x: np.ndarray, y: np.ndarray) -> float:
    keep = np.isfinite(x) & np.isfinite(y)
    return float(np.mean(np.abs(x[keep] - y[keep]))) if keep.any() else float("nan")


def gene_moment_agreement(real, generated) -> dict[str, float]:
    """Agreement of per-gene means, variances and zero fractions between real and generated cells.

    Parameters
    ----------
    real
        Real expression, (n_real, n_genes): array, sparse matrix or AnnData (``.X``).
    generated
        Generated expression for the same genes in the same order, (n_generated, n_genes).

    Returns
    -------
    dict
        ``mean_pearson``, ``variance_pearson`` and ``zero_fraction_pearson``: Pearson correlation
        across genes of each statistic (nan when a side is constant across genes);
        ``zero_fraction_mae``: mean over genes of the absolute difference in zero fraction.
    """
    generated = matched_by_name(real, generated, names=("real", "generated"))
    real, generated = as_matrix(real, name="real"), as_matrix(generated, name="generated")
    same_features(real, generated, names=("real", "generated"))
    real_mean, real_var, real_zeros = _gene_stats(real)
    gen_mean, gen_var, gen_zeros = _gene_stats(generated)
    return {
        "mean_pearson": _pearson(real_mean, gen_mean),
        "variance_pearson": _pearson(real_var, gen_var),
        "zero_fraction_pearson": _pearson(real_zeros, gen_zeros),
        "zero_fraction_mae": _mean_abs_error(real_zeros, gen_zeros),
    }


def posterior_predictive_gene_stats(observed, replicated) -> dict[str, Any]:
    """Posterior predictive check: per-gene coefficient of variation and zero fraction, observed vs replicated.

    Parameters
    ----------
    observed
        The data the model was fitted to, (n_cells, n_genes): array, sparse matrix or AnnData.
    replicated
        Data sampled from the fitted model for the same genes, (n_replicated, n_genes); stack
        several posterior draws as extra rows.

    Returns
    -------
    dict
        Per gene, (n_genes,) arrays: ``cv_observed``, ``cv_replicated`` (standard deviation over
        the absolute mean, so also defined for the negative means of scaled data; nan for a gene
        with mean 0), ``zero_fraction_observed``, ``zero_fraction_replicated``.
        Summaries over genes, floats: ``cv_pearson``, ``cv_mae`` (genes with a defined CV on both
        sides), ``zero_fraction_pearson``, ``zero_fraction_mae``.
    """
    replicated = matched_by_name(observed, replicated, names=("observed", "replicated"))
    observed, replicated = as_matrix(observed, name="observed"), as_matrix(replicated, name="replicated")
    same_features(observed, replicated, names=("observed", "replicated"))
    stats = {}
    for name, matrix in (("observed", observed), ("replicated", replicated)):
        mean, variance, zero_fraction = _gene_stats(matrix)
        with np.errstate(divide="ignore", invalid="ignore"):
            stats[f"cv_{name}"] = np.where(mean != 0, np.sqrt(variance) / np.abs(mean), np.nan)
        stats[f"zero_fraction_{name}"] = zero_fraction
    for statistic in ("cv", "zero_fraction"):
        pair = stats[f"{statistic}_observed"], stats[f"{statistic}_replicated"]
        stats[f"{statistic}_pearson"] = _pearson(*pair)
        stats[f"{statistic}_mae"] = _mean_abs_error(*pair)
    return stats


def _two_samples(a, b) -> tuple[np.ndarray, np.ndarray]:
    b = matched_by_name(a, b, names=("a", "b"))
    a, b = as_dense(a, name="a"), as_dense(b, name="b")
    same_features(a, b, names=("a", "b"))
    if min(a.shape[0], b.shape[0]) < 2:
        raise InputDataError(f"each sample needs at least 2 cells, got {a.shape[0]} and {b.shape[0]}.")
    return a, b


def median_bandwidth(x: np.ndarray) -> float:
    """Median heuristic: the median non-zero pairwise Euclidean distance of ``x`` (n, d); 1 if none."""
    distances = pdist(x)
    distances = distances[distances > 0]
    return float(np.median(distances)) if distances.size else 1.0


def mmd_rbf(a, b, *, bandwidth: float | None = None) -> float:
    """Unbiased squared maximum mean discrepancy with a Gaussian (RBF) kernel.

    The kernel is ``exp(-|x - y|^2 / (2 bandwidth^2))`` and the estimate is Gretton et al.'s
    (JMLR 2012) U-statistic: within-sample kernel means over distinct pairs, minus twice the
    cross-sample mean. It is about 0 (and can be slightly negative) for equal distributions.
    Memory grows as (n_a + n_b)^2; subsample large data or use :func:`pca_distance`.

    Parameters
    ----------
    a
        First sample, (n_a, n_features); at least 2 rows.
    b
        Second sample, (n_b, n_features); at least 2 rows.
    bandwidth
        Kernel width; default the median heuristic on the pooled sample (:func:`median_bandwidth`).

    Returns
    -------
    float
        The MMD^2 estimate.
    """
    a, b = _two_samples(a, b)
    if bandwidth is None:
        bandwidth = median_bandwidth(np.vstack([a, b]))
    elif not bandwidth > 0:
        raise ConfigError(f"bandwidth={bandwidth} must be positive, or None for the median heuristic.")
    gamma = 1 / (2 * bandwidth**2)
    n, m = a.shape[0], b.shape[0]
    within_a = (np.exp(-gamma * cdist(a, a, "sqeuclidean")).sum() - n) / (n * (n - 1))  # diagonal terms are 1
    within_b = (np.exp(-gamma * cdist(b, b, "sqeuclidean")).sum() - m) / (m * (m - 1))
    across = np.exp(-gamma * cdist(a, b, "sqeuclidean")).mean()
    return float(within_a + within_b - 2 * across)


def energy_distance(a, b) -> float:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between two samples (Székely & Rizzo).

    Expectations are means over all pairs (the V-statistic), so the value is never negative and
    is 0 for identical samples; in one dimension it is the square of
    :func:`scipy.stats.energy_distance`. Memory grows as (n_a + n_b)^2.

    Parameters
    ----------
    a
        First sample, (n_a, n_features); at least 2 rows.
    b
        Second sample, (n_b, n_features); at least 2 rows.

    Returns
    -------
    float
        The energy distance (Euclidean).
    """
    a, b = _two_samples(a, b)
    return float(2 * cdist(a, b).mean() - cdist(a, a).mean() - cdist(b, b).mean())


DISTANCES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"energy": energy_distance, "mmd": mmd_rbf}


def _shared_pca(real, generated, *, n_comps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Project both samples on the principal components of the pooled cells: (n_real, n_comps), (n_gen, n_comps)."""
    generated = matched_by_name(real, generated, names=("real", "generated"))
    real, generated = as_matrix(real, name="real"), as_matrix(generated, name="generated")
    same_features(real, generated, names=("real", "generated"))
    if sp.issparse(real) or sp.issparse(generated):
        pooled = sp.vstack([real, generated], format="csr")
    else:
        pooled = np.vstack([real, generated])
    if not 1 <= n_comps < min(pooled.shape):
        raise ConfigError(
            f"n_comps={n_comps} must be at least 1 and below min(n_cells, n_genes) = {min(pooled.shape)} "
            "of the pooled data."
        )
    components = PCA(n_components=n_comps, svd_solver="arpack", random_state=seed).fit_transform(pooled)
    return components[: real.shape[0]], components[real.shape[0] :]


def pca_distance(
    real, generated, *, n_comps: int = 20, metric: str = "energy", seed: int = 0, max_cells: int | None = 5000
) -> float:
    """Energy distance or MMD^2 between real and generated cells in a shared PCA space.

    The PCA is fitted on the pooled cells (so neither sample defines the axes), then each sample
    is subsampled to at most ``max_cells`` cells and compared by :func:`energy_distance` or
    :func:`mmd_rbf` (median-heuristic bandwidth).

    Parameters
    ----------
    real
        Real expression, (n_real, n_genes): array, sparse matrix or AnnData (``.X``).
    generated
        Generated expression for the same genes, (n_generated, n_genes).
    n_comps
        Principal components kept.
    metric
        ``"energy"`` or ``"mmd"``.
    seed
        Random state of the PCA solver and of the subsampling.
    max_cells
        Cells kept per sample for the pairwise distances; None keeps all (memory (n_real + n_generated)^2).

    Returns
    -------
    float
        The distance; about 0 when the two samples come from one distribution.
    """
    if metric not in DISTANCES:
        raise ConfigError(f"metric={metric!r} is not one of {sorted(DISTANCES)}.")
    if max_cells is not None and max_cells < 2:
        raise ConfigError(f"max_cells={max_cells} must be at least 2, or None to keep every cell.")
    real_pcs, generated_pcs = _shared_pca(real, generated, n_comps=n_comps, seed=seed)
    rng = np.random.default_rng(seed)
    if max_cells is not None:
        real_pcs, generated_pcs = (
            x[np.sort(rng.choice(x.shape[0], max_cells, replace=False))] if x.shape[0] > max_cells else x
            for x in (real_pcs, generated_pcs)
        )
    return DISTANCES[metric](real_pcs, generated_pcs)


CLASSIFIERS: dict[str, Callable[[int], Any]] = {
    "logistic": lambda seed: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
    "gbm": lambda seed: HistGradientBoostingClassifier(random_state=seed),
}


def classifier_two_sample_auc(
    real, generated, *, n_comps: int = 20, classifier: str = "logistic", n_folds: int = 5, seed: int = 0
) -> float:
    """Classifier two-sample test: held-out ROC AUC of a model telling real from generated cells.

    Both samples are projected on a shared PCA (fitted on the pooled cells, without the labels),
    then a classifier is scored by stratified ``n_folds``-fold cross-validation; the fold AUCs are
    averaged. The logistic regression sees differences in location; the gradient-boosted trees
    (``"gbm"``) also see differences in spread and shape.

    Parameters
    ----------
    real
        Real expression, (n_real, n_genes): array, sparse matrix or AnnData (``.X``).
    generated
        Generated expression for the same genes, (n_generated, n_genes).
    n_comps
        Principal components given to the classifier.
    classifier
        ``"logistic"`` (standardised logistic regression) or ``"gbm"`` (histogram gradient boosting).
    n_folds
        Cross-validation folds; each sample needs at least this many cells.
    seed
        Random state of the PCA, the fold split and the classifier.

    Returns
    -------
    float
        Mean held-out AUC: 0.5 = indistinguishable, 1 = perfectly told apart.
    """
    if classifier not in CLASSIFIERS:
        raise ConfigError(f"classifier={classifier!r} is not one of {sorted(CLASSIFIERS)}.")
    real_pcs, generated_pcs = _shared_pca(real, generated, n_comps=n_comps, seed=seed)
    if min(real_pcs.shape[0], generated_pcs.shape[0]) < n_folds:
        raise InputDataError(
            f"{n_folds}-fold cross-validation needs at least {n_folds} cells per sample, got "
            f"{real_pcs.shape[0]} real and {generated_pcs.shape[0]} generated; lower n_folds or add cells."
        )
    features = np.vstack([real_pcs, generated_pcs])
    is_generated = np.r_[np.zeros(real_pcs.shape[0], dtype=int), np.ones(generated_pcs.shape[0], dtype=int)]
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    aucs = cross_val_score(CLASSIFIERS[classifier](seed), features, is_generated, cv=folds, scoring="roc_auc")
    return float(np.mean(aucs))


def per_condition(
    fn: Callable[..., Any], real, generated, *, real_labels, generated_labels, **kwargs
) -> dict[Any, Any]:
    """Apply a real-vs-generated metric separately to the cells of each condition.

    Parameters
    ----------
    fn
        A metric called as ``fn(real_subset, generated_subset, **kwargs)``, e.g. :func:`pca_distance`.
    real
        Real cells, (n_real, n_genes): array, sparse matrix or AnnData.
    generated
        Generated cells, (n_generated, n_genes).
    real_labels
        Condition of each real cell, (n_real,).
    generated_labels
        Condition of each generated cell, (n_generated,).
    **kwargs
        Passed on to ``fn``.

    Returns
    -------
    dict
        ``{condition: fn(...)}`` for each condition present on both sides, in order of first
        appearance in ``real_labels``; conditions on one side only are skipped with a warning.

    Examples
    --------
    >>> per_condition(pca_distance, real, fake, real_labels=real.obs["drug"],
    ...               generated_labels=fake.obs["drug"], metric="mmd")  # doctest: +SKIP
    """
    real_labels = as_labels(real_labels, n_cells=real.shape[0], name="real_labels")
    generated_labels = as_labels(generated_labels, n_cells=generated.shape[0], name="generated_labels")
    conditions = [c for c in pd.unique(real_labels) if np.any(generated_labels == c)]
    one_sided = set(pd.unique(real_labels)).symmetric_difference(pd.unique(generated_labels))
    if one_sided:
        logger.warning("skipping conditions present on one side only: %s", sorted(map(str, one_sided)))
    if not conditions:
        raise InputDataError("real_labels and generated_labels share no condition; check that they use the same names.")
    return {c: fn(real[real_labels == c], generated[generated_labels == c], **kwargs) for c in conditions}
