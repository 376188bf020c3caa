"""Minibatches straight from CSR or dense matrices, never densifying the whole matrix."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from genailab.errors import ConfigError
from genailab.likelihood.sparse_counts import SparseCounts


@dataclass
class Batch:
    """One minibatch of B cells."""

    x: torch.Tensor  # (B, G) float32 expression
    c: torch.Tensor | None  # (B, raw_condition_dim) float32 conditions, or None
    index: torch.Tensor  # (B,) int64 row numbers in the source matrix
    y: torch.Tensor | None = None  # (B,) int64 labels for an auxiliary head (batch codes for the adversary)
    x_sparse: SparseCounts | None = None  # the stored entries of x, when the source matrix is sparse

    def to(self, device: torch.device) -> Batch:
        if device.type == "cpu":
            return self
        return Batch(
            x=self.x.to(device, non_blocking=True),
            c=None if self.c is None else self.c.to(device, non_blocking=True),
            index=self.index,
            y=None if self.y is None else self.y.to(device, non_blocking=True),
            x_sparse=None,  # the count likelihood uses it on the CPU only
        )


def gather_rows(matrix, rows: np.ndarray, *, with_sparse: bool = False):
    """Rows of a CSR or dense matrix as a dense float32 array (len(rows), n_cols).

    For CSR, scipy's compiled row indexing and densification do the work (no Python loop per
    row). With ``with_sparse``, also return the rows' stored entries as :class:`SparseCounts`
    (None for a dense matrix): the count likelihood then need not search the dense batch for
    its non-zeros.
    """
    if not sp.issparse(matrix):
        out = np.asarray(matrix[rows], dtype=np.float32)
        return (out, None) if with_sparse else out
    selected = matrix[rows]
    if selected.format != "csr":  # e.g. CSC or COO input
        selected = selected.tocsr()
    if selected.dtype != np.float32:
        selected = selected.astype(np.float32)
    out = selected.toarray()
    return (out, SparseCounts.from_scipy(selected)) if with_sparse else out


class MinibatchLoader:
    """Iterate over cells in minibatches, reshuffled each epoch from ``(seed, epoch)``.

    Parameters
    ----------
    matrix
        (n_cells, n_genes) CSR or dense matrix.
    conditions
        (n_cells, k) float32 condition matrix, or None.
    labels
        (n_cells,) integer labels carried as ``Batch.y`` (e.g. batch codes for an adversary), or None.
    indices
        Rows to iterate over (e.g. the training split); all rows by default.
    batch_size, shuffle, seed, drop_last
        Usual meanings; the order of epoch e depends only on (seed, e), so a resumed run sees the
        same batches as an uninterrupted one.
    sparse_counts
        Also hand over each batch's stored entries (``Batch.x_sparse``), which the count
        likelihood uses; inference that only encodes or decodes can skip them.
    """

    def __init__(
        self,
        matrix,
        conditions: np.ndarray | None = None,
        *,
        labels: np.ndarray | None = None,
        indices: np.ndarray | None = None,
        batch_size: int = 128,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        sparse_counts: bool = True,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}.")
        if sp.issparse(matrix) and not sp.isspmatrix_csr(matrix):
            matrix = sp.csr_matrix(matrix)
        self.matrix = matrix
        self.conditions = None if conditions is None else np.ascontiguousarray(conditions, dtype=np.float32)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.indices = np.arange(matrix.shape[0]) if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= matrix.shape[0]):
            raise ConfigError(f"Row indices must lie in [0, {matrix.shape[0]}); got {self.indices.min()}..{self.indices.max()}.")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.sparse_counts = sparse_counts
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.indices.size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self) -> np.ndarray:
        """The rows of this epoch in visiting order."""
        if not self.shuffle:
            return self.indices
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.indices)

    def __iter__(self) -> Iterator[Batch]:
        order = self.order()
        for i in range(len(self)):
            rows = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.batch(rows)

    def batch(self, rows: np.ndarray) -> Batch:
        """The :class:`Batch` for the given row numbers."""
        if self.sparse_counts:
            x, x_sparse = gather_rows(self.matrix, rows, with_sparse=True)
        else:
            x, x_sparse = gather_rows(self.matrix, rows), None
        c = None if self.conditions is None else torch.from_numpy(self.conditions[rows])
        y = None if self.labels is None else torch.from_numpy(self.labels[rows])
        return Batch(x=torch.from_numpy(x), c=c, index=torch.from_numpy(np.asarray(rows, dtype=np.int64)), y=y,
                     x_sparse=x_sparse)
