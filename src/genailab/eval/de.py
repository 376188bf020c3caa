"""Agreement of differential-expression results: shared top genes, and calls against a truth."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from genailab.errors import ConfigError, InputDataError
from genailab.eval._inputs import matched_by_name


def _vector(values, *, name: str, dtype=np.float64) -> np.ndarray:
    try:
        vector = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise InputDataError(f"{name} could not be read as a {np.dtype(dtype).name} vector ({error}).") from error
    if vector.ndim != 1 or vector.size == 0:
        raise InputDataError(f"{name} must be a non-empty 1-D array with one entry per gene, got shape {vector.shape}.")
    return vector


def top_k_overlap(scores_a, scores_b, *, k: int = 50) -> float:
    """Fraction of the top ``k`` genes by absolute score that two DE results share: ``|A ∩ B| / k``.

    This is the overlap fraction, not the Jaccard index (which would be ``|A ∩ B| / |A ∪ B|``).
    Ties in ``|score|`` go to the gene with the lower index.

    Parameters
    ----------
    scores_a
        A score per gene (log fold change, z-score, ...), (n_genes,).
    scores_b
        Scores for the same genes in the same order, (n_genes,).
    k
        Top genes compared, at most n_genes.

    Returns
    -------
    float
        In [0, 1]; 1 = the same top-k genes (in any order).

    Examples
    --------
    >>> top_k_overlap([5.0, -4.0, 0.1, 0.2], [3.0, 0.0, -2.0, 0.1], k=2)
    0.5
    """
    scores_b = matched_by_name(scores_a, scores_b, names=("scores_a", "scores_b"))
    a, b = _vector(scores_a, name="scores_a"), _vector(scores_b, name="scores_b")
    if a.shape != b.shape:
        raise InputDataError(f"scores_a has {a.size} genes and scores_b {b.size}; align both to the same genes.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise InputDataError("scores contain NaN or infinite values; drop those genes or set their scores to 0.")
    if not 1 <= k <= a.size:
        raise ConfigError(f"k={k} must be between 1 and the number of genes ({a.size}).")
    top_a = np.argsort(-np.abs(a), kind="stable")[:k]
    top_b = np.argsort(-np.abs(b), kind="stable")[:k]
    return np.intersect1d(top_a, top_b).size / k


def _calls(values, *, name: str) -> np.ndarray:
    """Per-gene yes/no calls, (n_genes,) bool, from bools or 0/1 integers; anything else is refused."""
    array = np.asarray(values)
    is_binary_int = np.issubdtype(array.dtype, np.integer) and np.isin(array, (0, 1)).all()
    if array.dtype != bool and not is_binary_int:
        raise InputDataError(
            f"{name} must hold True/False (or 0/1) per gene, got {array.dtype} values; turn scores into calls "
            f"first, e.g. {name}=padj < 0.05.",
            argument=name,
        )
    return _vector(array, name=name, dtype=bool)


def precision_recall(called, truth) -> dict[str, float]:
    """Precision, recall and F1 of DE calls against the truly differential genes.

    Parameters
    ----------
    called
        Whether each gene was called differential, (n_genes,) bool or 0/1 integers (e.g. ``padj < 0.05``).
    truth
        Whether each gene truly is differential, (n_genes,) bool or 0/1 integers.

    Returns
    -------
    dict
        ``precision`` (share of calls that are true; nan if nothing was called), ``recall``
        (share of true genes called; nan if no gene is true) and ``f1`` (nan if both are
        undefined, 0 if precision and recall are 0).

    Examples
    --------
    >>> precision_recall([True, True, False, False], [True, False, True, False])
    {'precision': 0.5, 'recall': 0.5, 'f1': 0.5}
    """
    truth = matched_by_name(called, truth, names=("called", "truth"))
    called, truth = _calls(called, name="called"), _calls(truth, name="truth")
    if called.shape != truth.shape:
        raise InputDataError(f"called has {called.size} genes and truth {truth.size}; align both to the same genes.")
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, called, average="binary", zero_division=np.nan
    )
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}
