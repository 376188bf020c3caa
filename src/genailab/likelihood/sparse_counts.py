"""A minibatch's non-zero counts in compressed sparse row form, as plain tensors.

The loaders cut minibatches out of CSR matrices, so they hand the likelihood the batch's
sparse structure for free; the count terms that vanish at zero are then evaluated on the
stored entries only (see :mod:`genailab.likelihood.fused_nll`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch


class SparseCounts(NamedTuple):
    """The stored entries of a (B, G) count matrix, row by row.

    ``row_starts`` (B + 1,) int64: the entries of row i are ``row_starts[i]:row_starts[i + 1]``;
    ``genes`` (nnz,) int32 column of each entry; ``counts`` (nnz,) float value of each entry
    (explicitly stored zeros are allowed: every term they would add is 0).
    """

    row_starts: torch.Tensor
    genes: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def from_scipy(cls, matrix: sp.csr_matrix) -> SparseCounts:
        """From a scipy CSR matrix (its arrays are shared where the dtypes allow)."""
        return cls(
            torch.from_numpy(np.asarray(matrix.indptr, dtype=np.int64)),
            torch.from_numpy(np.asarray(matrix.indices, dtype=np.int32)),
            torch.from_numpy(np.asarray(matrix.data, dtype=np.float32)),
        )

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> SparseCounts:
        """From a dense (B, G) tensor, on its device."""
        rows, genes = x.nonzero(as_tuple=True)
        row_starts = torch.zeros(x.shape[0] + 1, dtype=torch.int64, device=x.device)
        row_starts[1:] = torch.bincount(rows, minlength=x.shape[0]).cumsum(0)
        return cls(row_starts, genes.int(), x[rows, genes])

    def to_dense(self, n_cols: int) -> torch.Tensor:
        """The (B, n_cols) dense matrix, on the entries' device."""
        dense = torch.zeros(self.n_rows, n_cols, dtype=self.counts.dtype, device=self.counts.device)
        return dense.index_put_((self.rows(), self.genes.long()), self.counts, accumulate=True)  # duplicates add up, as in scipy

    @property
    def n_rows(self) -> int:
        return self.row_starts.numel() - 1

    def rows(self) -> torch.Tensor:
        """(nnz,) row of each entry."""
        lengths = self.row_starts.diff()
        return torch.repeat_interleave(torch.arange(self.n_rows, device=lengths.device), lengths, output_size=self.genes.numel())

