"""Turn the inputs the metrics accept (numpy arrays, scipy sparse matrices, AnnData) into checked
float64 matrices and label vectors, with errors that say how to fix the input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from genailab.errors import InputDataError


def as_matrix(data, *, name: str) -> np.ndarray | sp.csr_matrix:
    """A (n_cells, n_features) float64 ndarray, or CSR matrix for sparse input (never densified).

    AnnData contributes its ``.X``; pass ``adata.layers[...]`` or ``adata.obsm[...]`` for another
    matrix. Nested lists and pandas DataFrames (e.g. ``get_normalized_expression(return_pandas=True)``)
    are read as dense arrays.
    """
    if isinstance(data, AnnData):
        data = data.X
        if data is None:
            raise InputDataError(f"{name} is an AnnData without .X; pass the matrix to compare instead.")
    try:
        # a copy for sparse input: scipy shares the caller's index arrays across a dtype change, and sorting
        # them (as its arithmetic does) would scramble the caller's matrix
        matrix = sp.csr_matrix(data, dtype=np.float64, copy=True) if sp.issparse(data) else np.asarray(data, np.float64)
    except (TypeError, ValueError) as error:
        raise InputDataError(f"{name} could not be read as a numeric matrix ({error}).") from error
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise InputDataError(
            f"{name} must be a non-empty 2-D (n_cells, n_features) matrix, got shape {matrix.shape}; "
            "reshape a single cell with x[None, :] or a single feature with x[:, None]."
        )
    values = matrix.data if sp.issparse(matrix) else matrix
    if not np.all(np.isfinite(values)):
        raise InputDataError(f"{name} contains NaN or infinite values; remove or impute them first.")
    return matrix


def as_dense(data, *, name: str) -> np.ndarray:
    """As :func:`as_matrix`, densified: for metrics that need all pairwise distances anyway."""
    matrix = as_matrix(data, name=name)
    return matrix.toarray() if sp.issparse(matrix) else matrix


def as_labels(labels, *, n_cells: int, name: str) -> np.ndarray:
    """A 1-D array of ``n_cells`` labels (any hashable values: strings, ints, categories), none missing.

    A missing label (NaN, None, pandas' NA) is refused rather than counted as a group of its own.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n_cells:
        raise InputDataError(
            f"{name} must be 1-D with one entry per cell ({n_cells}), got shape {labels.shape}; "
            "pass e.g. adata.obs['cell_type'] for the same cells in the same order.",
            argument=name,
        )
    n_missing = int(pd.isna(labels).sum())
    if n_missing:
        raise InputDataError(
            f"{name} has missing values (NaN or None) in {n_missing} of {n_cells} cells; drop those cells "
            "(e.g. keep = adata.obs[key].notna()) or fill them with a label of their own.",
            argument=name,
        )
    return labels


def latent_and_labels(latent, labels, *, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A dense latent (n_cells, n_dims) and its checked labels (n_cells,), ``name`` naming the labels."""
    latent = as_dense(latent, name="latent")
    return latent, as_labels(labels, n_cells=latent.shape[0], name=name)


def _feature_names(data) -> pd.Index | None:
    if isinstance(data, AnnData):
        return data.var_names
    if isinstance(data, pd.DataFrame):
        return data.columns
    return None


def matched_by_name(a, b, *, names: tuple[str, str]):
    """``b`` with its genes in ``a``'s order when both name them (AnnData ``var_names``, DataFrame
    columns, Series index); two sets of names that differ are an error. Unnamed inputs pass as given."""
    if isinstance(a, pd.Series) and isinstance(b, pd.Series):
        index_a, index_b = a.index, b.index
    else:
        index_a, index_b = _feature_names(a), _feature_names(b)
    unnamed = any(index is None or isinstance(index, pd.RangeIndex) for index in (index_a, index_b))
    if unnamed or index_a.equals(index_b):
        return b
    if not (index_a.is_unique and index_b.is_unique and set(index_a) == set(index_b)):
        only = sorted(set(map(str, index_a)).symmetric_difference(map(str, index_b)))[:5]
        raise InputDataError(
            f"{names[0]} and {names[1]} name different genes (e.g. {only}); subset both to the same genes "
            "(e.g. generated[:, real.var_names])."
        )
    if isinstance(b, AnnData):
        return b[:, index_a]
    return b.reindex(index_a) if isinstance(b, pd.Series) else b.reindex(columns=index_a)


def same_features(a: np.ndarray | sp.csr_matrix, b: np.ndarray | sp.csr_matrix, *, names: tuple[str, str]) -> None:
    """Raise unless both matrices have the same number of columns (genes or components)."""
    if a.shape[1] != b.shape[1]:
        raise InputDataError(
            f"{names[0]} has {a.shape[1]} features but {names[1]} has {b.shape[1]}; subset both to the "
            "same genes in the same order (e.g. generated[:, real.var_names])."
        )
