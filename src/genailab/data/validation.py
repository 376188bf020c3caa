"""Checks on expression matrices before a model sees them, with errors that say how to fix them.

All checks work on dense arrays and on CSR/CSC matrices without densifying them, and on a backed
matrix (:class:`~genailab.data.backed.OnDiskMatrix`) block by block.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from genailab.data.backed import OnDiskMatrix, row_blocks
from genailab.data.sparse_structure import check_sparse_structure
from genailab.errors import ConfigError, InputDataError

logger = logging.getLogger(__name__)

EMPTY_CELL_ACTIONS = ("error", "drop", "warn")
_CHUNK = 1 << 16  # values checked at a time
SCALE_CELLS = 2000  # cells read to measure a matrix's value scale
SCALE_RATIO = 3.0  # value scales further apart than this are not the same preparation of the data
RAW_COUNT_SCALE = 4.0  # whole numbers above this value scale are counts (below it: e.g. 0/1 indicators)


def _values(matrix) -> np.ndarray:
    """The stored values of a matrix: ``.data`` for sparse, the flat array for dense."""
    return matrix.data if sp.issparse(matrix) else np.asarray(matrix).ravel()


def is_integer_counts(matrix) -> bool:
    """True when every value is a non-negative integer (within float rounding)."""
    if isinstance(matrix, OnDiskMatrix):
        return all(is_integer_counts(block) for block in row_blocks(matrix))
    values = _values(matrix)
    if values.size == 0:
        return True
    if np.issubdtype(values.dtype, np.integer):
        return bool(values.min() >= 0)
    with np.errstate(invalid="ignore"):  # inf - inf is NaN: not whole, as it should be
        for start in range(0, values.size, _CHUNK):  # chunks that stay in cache: several times faster
            chunk = values[start : start + _CHUNK]
            # False for NaN and inf too; the relative test only where the fast absolute one fails
            if not (chunk.min() >= 0 and (np.abs(chunk - np.round(chunk)).max() < 1e-6 or _whole(chunk).all())):
                return False
    return True


def _whole(values: np.ndarray) -> np.ndarray:
    """Which values are whole numbers within float rounding: 1e-6 absolute, relative above 1 (a
    float32 count of 36 read back as 35.999996 is whole)."""
    return np.abs(values - np.round(values)) <= 1e-6 * np.maximum(1.0, np.abs(values))


def check_expression(
    matrix, *, counts: bool, source: str = "the data", remedy: str | None = None, structure_checked: bool = False
) -> None:
    """Raise :class:`InputDataError` for a damaged sparse structure (indptr, indices), NaN/Inf, and
    for negative or non-integer values when ``counts`` is True (count models need raw UMI/read counts).
    ``remedy`` replaces the fix these last two messages suggest (choosing the raw-count ``layer``
    or the Gaussian model) where the caller cannot choose either. ``structure_checked`` skips the
    structure pass of an in-memory matrix that came from an already checked one
    (:meth:`~genailab.data.schema.DataSchema.expression` checks its source); the blocks of a backed
    matrix are always checked, as nothing else checks them."""
    if isinstance(matrix, OnDiskMatrix):
        for block in row_blocks(matrix):
            check_expression(block, counts=counts, source=source, remedy=remedy)
        return
    if not structure_checked:
        check_sparse_structure(matrix, source=source)
    values = _values(matrix)
    if values.size and not np.issubdtype(values.dtype, np.number):
        raise InputDataError(f"{source} has non-numeric values (dtype {values.dtype}); convert it to numbers.")
    if counts and values.size and np.issubdtype(values.dtype, np.floating) and is_integer_counts(values):
        return  # non-negative whole numbers, so finite too: the one pass that valid counts take
    if values.size and not np.issubdtype(values.dtype, np.integer):
        bad = ~np.isfinite(values)
        if bad.any():
            raise InputDataError(
                f"{source} contains {int(bad.sum())} NaN or infinite values (a value beyond float32's range, "
                "3.4e38, is infinite once read); remove or impute them (e.g. replace with 0 for missing counts) "
                "before training."
            )
    if not counts or values.size == 0:
        return
    if values.min() < 0:
        raise InputDataError(
            f"{source} has negative values (min {values.min():.4g}), but count models (nb, zinb) need raw "
            "counts. " + (remedy or "Point `layer` at the raw-count layer, or use the Gaussian model for normalised data.")
        )
    if not is_integer_counts(matrix):
        fractional = values[~_whole(values)]
        raise InputDataError(
            f"{source} has {fractional.size} non-integer values (e.g. {float(fractional[0]):.9g}); count models "
            "(nb, zinb) need raw integer counts. "
            + (remedy or "Point `layer` at the raw-count layer (often layers['counts']), or use the Gaussian model "
               "(likelihood='gaussian') for log-normalised data.")
        )


def value_scale(matrix) -> float:
    """The median over cells of each cell's largest value, from at most ``SCALE_CELLS`` cells spread
    over the matrix (a backed matrix: its first cells). Log-normalised data sit near 3-8, raw counts
    in the tens to thousands, standardised data near 10: how a new AnnData is told apart from the
    preparation a Gaussian model was trained on."""
    if matrix.shape[0] == 0:
        return 0.0
    largest = _scale_sample(matrix).max(axis=1)
    largest = largest.toarray() if sp.issparse(largest) else np.asarray(largest)
    scale = float(np.median(largest.astype(np.float64)))
    return scale if np.isfinite(scale) else 0.0  # NaN/Inf: check_expression names them


def _scale_sample(matrix):
    """At most ``SCALE_CELLS`` rows spread over ``matrix`` (a backed matrix: its first rows)."""
    n_cells = matrix.shape[0]
    if isinstance(matrix, OnDiskMatrix):
        return matrix.read(0, min(n_cells, SCALE_CELLS))
    if sp.issparse(matrix) and matrix.format not in ("csr", "csc"):
        matrix = matrix.tocsr()
    return matrix[np.unique(np.linspace(0, n_cells - 1, min(n_cells, SCALE_CELLS)).astype(np.int64))]


def warn_if_raw_counts(matrix, *, source: str) -> None:
    """Log a warning when the values a Gaussian model is about to be trained on look like raw counts:
    whole numbers (log-normalised and scaled values are not) whose :func:`value_scale` is above
    ``RAW_COUNT_SCALE``. Such a model fits the counts' scale, not the log-normal expression it is
    made for, without an error."""
    scale = value_scale(matrix)
    if scale > RAW_COUNT_SCALE and is_integer_counts(_scale_sample(matrix)):
        logger.warning(
            "%s holds whole numbers with a median largest value per cell of %.3g: it looks like raw counts, "
            "which the Gaussian model does not describe. Use a count likelihood ('nb' or 'zinb'), or "
            "log-normalise first (sc.pp.normalize_total(adata, target_sum=1e4), then sc.pp.log1p(adata)).",
            source, scale,
        )


def warn_if_other_scale(matrix, trained_scale: float, *, source: str) -> None:
    """Log a warning when ``matrix``'s :func:`value_scale` is more than ``SCALE_RATIO`` times above
    or below ``trained_scale``, that of the data a Gaussian model was trained on (raw counts given
    to a model of log-normalised values embed far from every training cell, without an error)."""
    scale = value_scale(matrix)
    if trained_scale <= 0 or scale <= 0 or max(scale / trained_scale, trained_scale / scale) <= SCALE_RATIO:
        return
    logger.warning(
        "%s is on another scale than the data this Gaussian model was trained on (median of each cell's "
        "largest value %.3g, against %.3g in training): prepare it as the training data were (for "
        "log-normalised training data, sc.pp.normalize_total(adata, target_sum=1e4) then sc.pp.log1p(adata) "
        "on raw counts), or its latent and expression will be far from every training cell.",
        source, scale, trained_scale,
    )


def gene_variances(matrix) -> np.ndarray:
    """Variance of each gene over the cells (population form), (n_genes,) float64."""
    n_cells, total, squares = 0, 0.0, 0.0
    for block in row_blocks(matrix):
        block = sp.csr_matrix(block, dtype=np.float64, copy=True) if sp.issparse(block) else np.asarray(block, dtype=np.float64)
        n_cells += block.shape[0]
        total = total + np.asarray(block.sum(axis=0)).ravel()
        squares = squares + np.asarray((block.multiply(block) if sp.issparse(block) else block * block).sum(axis=0)).ravel()
    mean = total / max(n_cells, 1)
    return np.maximum(squares / max(n_cells, 1) - mean * mean, 0.0)


def cell_totals(matrix) -> np.ndarray:
    """Per-cell sum of a (n_cells, n_genes) matrix as float64, (n_cells,)."""
    if isinstance(matrix, OnDiskMatrix):
        return np.concatenate([cell_totals(block) for block in row_blocks(matrix)])
    return np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()


def _absolute_totals(matrix, rows: np.ndarray) -> np.ndarray:
    """Sum of absolute values of the cells ``rows`` (sorted positions), (len(rows),) float64."""
    if isinstance(matrix, OnDiskMatrix):
        return np.concatenate([_absolute_totals(block, np.arange(block.shape[0])) for block in row_blocks(matrix)])[rows]
    picked = matrix[rows]
    return np.asarray(abs(picked).sum(axis=1), dtype=np.float64).ravel()


def empty_cells(matrix, *, action: str = "error", source: str = "the data") -> np.ndarray:
    """Return a boolean mask of cells to keep, acting on cells whose counts are all zero.

    ``action`` is ``"error"`` (raise), ``"drop"`` (log a warning and drop them) or ``"warn"``
    (log a warning and keep them).
    """
    if action not in EMPTY_CELL_ACTIONS:
        raise ConfigError(f"empty_cells={action!r} is not one of {EMPTY_CELL_ACTIONS}.")
    keep = cell_totals(matrix) > 0
    doubtful = np.flatnonzero(~keep)  # zero or negative totals: only an all-zero cell is empty (scaled data sum below 0)
    if doubtful.size:
        keep[doubtful] = _absolute_totals(matrix, doubtful) > 0
    n_empty = int((~keep).sum())
    if n_empty == 0:
        return keep
    message = f"{source} has {n_empty} of {keep.size} cells with zero total counts"
    if action == "error":
        raise InputDataError(
            message + "; remove them (e.g. sc.pp.filter_cells(adata, min_counts=1)) or pass "
            "empty_cells='drop' to drop them with a warning."
        )
    if action == "drop":
        logger.warning("%s; dropping them.", message)
        return keep
    logger.warning("%s; keeping them as asked.", message)
    return np.ones_like(keep)
