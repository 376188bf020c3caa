"""Imputation benchmark of scVI (Lopez et al., Nat. Methods 2018): hide a share of the non-zero
counts by setting them to zero, fit the model on the corrupted matrix, and score its predictions
at the hidden entries by the median absolute error.

>>> masked, rows, cols, true = mask_counts(adata.X, fraction=0.1, seed=0)  # doctest: +SKIP
>>> # fit on masked, predict expected counts `pred` (n_cells, n_genes) at the cells' library sizes
>>> imputation_score(pred, rows, cols, true_values=true)  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from genailab.errors import ConfigError, InputDataError
from genailab.eval._inputs import as_matrix


def mask_counts(
    counts, *, fraction: float = 0.1, seed: int = 0
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """Hide ``round(fraction * nnz)`` non-zero entries, chosen uniformly, by setting them to zero.

    Works on a CSR copy and never densifies; the input is left unchanged. Explicitly stored
    zeros are not counted as non-zero entries.

    Parameters
    ----------
    counts
        Counts, (n_cells, n_genes): sparse matrix (best), dense array or AnnData (``.X``).
    fraction
        Share of the non-zero entries to hide, in (0, 1).
    seed
        Random state of the choice.

    Returns
    -------
    masked : scipy.sparse.csr_matrix
        The counts with the hidden entries removed, (n_cells, n_genes), float64.
    rows, cols : numpy.ndarray
        Cell and gene index of each hidden entry, (n_masked,), in row-major order.
    true_values : numpy.ndarray
        The hidden counts, (n_masked,).
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"fraction={fraction} must lie strictly between 0 and 1.")
    masked = sp.csr_matrix(as_matrix(counts, name="counts"), copy=True)
    masked.eliminate_zeros()
    masked.sort_indices()
    n_masked = int(np.floor(fraction * masked.nnz + 0.5))  # round half up, unlike Python's round
    if n_masked == 0:
        raise InputDataError(
            f"fraction={fraction} of {masked.nnz} non-zero entries rounds to none; raise fraction or pass more data."
        )
    hidden = np.sort(np.random.default_rng(seed).choice(masked.nnz, size=n_masked, replace=False))
    rows = np.repeat(np.arange(masked.shape[0]), np.diff(masked.indptr))[hidden]
    cols = masked.indices[hidden].copy()
    true_values = masked.data[hidden].copy()
    masked.data[hidden] = 0
    masked.eliminate_zeros()
    return masked, rows, cols, true_values


def imputation_median_l1(predicted_at_masked, true_values) -> float:
    """Median absolute error between predictions and the hidden true values.

    Parameters
    ----------
    predicted_at_masked
        Predicted values at the hidden entries, (n_masked,).
    true_values
        The hidden counts from :func:`mask_counts`, (n_masked,).

    Returns
    -------
    float
        ``median(|predicted - true|)``; 0 is perfect.
    """
    predicted = np.asarray(predicted_at_masked, dtype=np.float64)
    true_values = np.asarray(true_values, dtype=np.float64)
    if predicted.ndim != 1 or predicted.shape != true_values.shape or predicted.size == 0:
        raise InputDataError(
            f"predicted_at_masked {predicted.shape} and true_values {true_values.shape} must be equal-length, "
            "non-empty 1-D arrays; gather predictions with predicted[rows, cols]."
        )
    if not (np.all(np.isfinite(predicted)) and np.all(np.isfinite(true_values))):
        raise InputDataError("predicted_at_masked or true_values contains NaN or infinite values.")
    return float(np.median(np.abs(predicted - true_values)))


def imputation_score(predicted, rows, cols, *, true_values) -> float:
    """:func:`imputation_median_l1` of a full prediction matrix read at the hidden entries.

    Parameters
    ----------
    predicted
        Predicted counts for every entry, (n_cells, n_genes): array, sparse matrix, DataFrame (e.g.
        ``get_normalized_expression(return_pandas=True)``) or AnnData (``.X``).
    rows, cols
        Hidden entries, (n_masked,), from :func:`mask_counts`.
    true_values
        The hidden counts, (n_masked,), from :func:`mask_counts`.

    Returns
    -------
    float
        Median absolute error at the hidden entries.
    """
    matrix = as_matrix(predicted, name="predicted")
    rows, cols = np.asarray(rows), np.asarray(cols)
    integers = all(np.issubdtype(index.dtype, np.integer) for index in (rows, cols))
    if rows.ndim != 1 or rows.shape != cols.shape or not integers:
        raise InputDataError(
            f"rows {rows.shape} and cols {cols.shape} must be equal-length 1-D integer arrays; pass the rows "
            "and cols that mask_counts returned."
        )
    n_cells, n_genes = matrix.shape
    if rows.size and not (0 <= rows.min() <= rows.max() < n_cells and 0 <= cols.min() <= cols.max() < n_genes):
        raise InputDataError(
            f"rows/cols point outside predicted {matrix.shape} (rows must lie in 0..{n_cells - 1}, cols in "
            f"0..{n_genes - 1}); predict for the same cells and genes as were masked."
        )
    values = np.asarray(matrix[rows, cols]).ravel()
    return imputation_median_l1(values, true_values)
