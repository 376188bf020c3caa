"""Checks that a compressed sparse matrix (CSR, or CSC) is structurally sound before it is indexed.

scipy and the C++ kernels under it trust ``indptr`` and ``indices``: an index beyond the number of
columns (e.g. bytes overwritten inside an h5ad) reads or writes outside an array, which gives a
wrong result or crashes the interpreter. These checks cost one pass over ``indptr`` and one over
``indices`` (in cache-sized chunks) and raise :class:`~genailab.errors.InputDataError` instead.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from genailab.errors import InputDataError

_CHUNK = 1 << 16  # indices checked at a time


def check_sparse_structure(matrix, *, source: str = "the data") -> None:
    """Raise :class:`InputDataError` when a CSR/CSC ``matrix`` has an invalid ``indptr`` or
    ``indices`` (other sparse formats: out-of-range coordinates); dense input passes."""
    if not sp.issparse(matrix):
        return
    if matrix.format in ("csr", "csc"):
        n_major, n_minor = matrix.shape if matrix.format == "csr" else matrix.shape[::-1]
        rows = "rows" if matrix.format == "csr" else "columns"
        if matrix.indices.shape != matrix.data.shape:
            _damaged(source, f"it stores {matrix.indices.size} indices for {matrix.data.size} values")
        check_indptr(matrix.indptr, n_major=n_major, n_stored=matrix.indices.size, source=source, rows=rows)
        check_indices(matrix.indices, matrix.indptr, n_minor=n_minor, source=source, rows=rows)
    elif matrix.format == "coo":
        for name, coordinate, size in (("row", matrix.row, matrix.shape[0]), ("column", matrix.col, matrix.shape[1])):
            if coordinate.size and (coordinate.min() < 0 or coordinate.max() >= size):
                _damaged(source, f"it has {name} coordinates outside 0..{size - 1}")


def check_indptr(indptr: np.ndarray, *, n_major: int, n_stored: int, source: str, rows: str = "rows",
                 first_row: int = 0) -> None:
    """``indptr`` (n_major + 1,) of the rows ``first_row:first_row + n_major`` must rise from 0 (or,
    for a slice of a larger matrix, from any stored position) to at most ``n_stored``, never falling."""
    if indptr.size != n_major + 1:
        _damaged(source, f"its indptr has {indptr.size} entries for {n_major} {rows} (it needs {n_major + 1})")
    if first_row == 0 and indptr[0] != 0:
        _damaged(source, f"its indptr starts at {int(indptr[0])}, not 0")
    if indptr[0] < 0 or indptr[-1] > n_stored:
        _damaged(source, f"its indptr points outside the {n_stored} stored values (from {int(indptr[0])} to "
                         f"{int(indptr[-1])})")
    steps = np.diff(indptr)
    if steps.size and steps.min() < 0:
        row = int(np.argmax(steps < 0))
        _damaged(source, f"its indptr decreases at {rows[:-1]} {first_row + row} (from {int(indptr[row])} to "
                         f"{int(indptr[row + 1])})")


def check_indices(indices: np.ndarray, indptr: np.ndarray, *, n_minor: int, source: str, rows: str = "rows",
                  first_row: int = 0) -> None:
    """Every index ``indices[indptr[0]:indptr[-1]]`` must lie in ``0..n_minor - 1``; ``indptr`` (already
    checked) gives the rows ``first_row:...`` of those positions, to name the row of a bad index."""
    lo, hi = int(indptr[0]), int(indptr[-1])
    for start in range(lo, hi, _CHUNK):
        chunk = indices[start : min(start + _CHUNK, hi)]
        if chunk.min() < 0 or chunk.max() >= n_minor:
            where = start + int(np.argmax((chunk < 0) | (chunk >= n_minor)))
            row = first_row + int(np.searchsorted(indptr, where, side="right")) - 1
            what = "column" if rows == "rows" else "row"
            _damaged(source, f"it stores {what} index {int(indices[where])} in {rows[:-1]} {row}, outside "
                             f"0..{n_minor - 1}")


def _damaged(source: str, problem: str):
    raise InputDataError(
        f"{source} is a damaged sparse matrix: {problem}. The file was probably corrupted (or the matrix's "
        "arrays edited in place); re-create it from a good copy. scipy's matrix.check_format(full_check=True) "
        "finds the same problem."
    )
