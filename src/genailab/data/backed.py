"""Out-of-core minibatches from a backed h5ad (``anndata.read_h5ad(path, backed="r")``).

The matrix stays on disk. :class:`OnDiskMatrix` reads contiguous row ranges with one slice of each
stored array (``X/indptr``, ``X/indices``, ``X/data``, or the dense array); :class:`ChunkedLoader`
shuffles across chunks (their visiting order) and within them (the rows of the few chunks held in
memory at once), so one epoch reads every row exactly once and never the whole matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import h5py
import numpy as np
import scipy.sparse as sp
import torch
from anndata.abc import CSCDataset, CSRDataset

from genailab.data.loader import Batch, MinibatchLoader, gather_rows
from genailab.errors import ConfigError, InputDataError

SCAN_ROWS = 8192  # rows per read when a whole matrix is scanned (validation, cell totals, hashing)
CHUNK_ROWS = 2048  # default rows per contiguous read while training
CHUNKS_IN_MEMORY = 8  # default chunks read together and shuffled row by row


def is_on_disk(matrix) -> bool:
    """True for the ``X`` of an AnnData opened with ``backed="r"`` (a sparse dataset or an HDF5 array)."""
    return isinstance(matrix, (CSRDataset, CSCDataset, h5py.Dataset))


class OnDiskMatrix:
    """A backed (n_cells, n_genes) matrix read by contiguous row ranges as float32 CSR or dense blocks.

    Parameters
    ----------
    source
        ``adata.X`` of a backed AnnData: a CSR dataset or a dense HDF5 array.
    transform
        Applied to every block read (the model's gene order, float32); the width of its output
        sets ``shape[1]``.
    """

    def __init__(self, source, *, transform: Callable | None = None):
        if isinstance(source, CSCDataset):
            raise InputDataError(
                "The backed matrix is stored as CSC (by genes), which cannot be read cell by cell; rewrite it as "
                "CSR: adata = anndata.read_h5ad(path); adata.X = adata.X.tocsr(); adata.write_h5ad(path)."
            )
        self.source = source
        self.transform = transform
        self.shape = (int(source.shape[0]), self.read(0, 0).shape[1])

    def read(self, start: int, stop: int):
        """Rows ``start:stop``, read with one slice of each stored array."""
        if isinstance(self.source, h5py.Dataset):
            block = np.asarray(self.source[start:stop], dtype=np.float32)
        else:
            group = self.source.group
            indptr = group["indptr"][start : stop + 1].astype(np.int64)
            lo, hi = int(indptr[0]), int(indptr[-1])
            values = group["data"][lo:hi].astype(np.float32, copy=False)
            block = sp.csr_matrix((values, group["indices"][lo:hi], indptr - lo), shape=(stop - start, self.source.shape[1]))
        return block if self.transform is None else self.transform(block)

    def blocks(self, rows: int = SCAN_ROWS) -> Iterator:
        """All rows in order, ``rows`` at a time."""
        for start in range(0, self.shape[0], rows):
            yield self.read(start, min(start + rows, self.shape[0]))


def row_blocks(matrix, rows: int = SCAN_ROWS) -> Iterator:
    """Consecutive row blocks of an in-memory (CSR or dense) or :class:`OnDiskMatrix` matrix."""
    if isinstance(matrix, OnDiskMatrix):
        yield from matrix.blocks(rows)
        return
    for start in range(0, matrix.shape[0], rows):
        yield matrix[start : start + rows]


class ChunkedLoader:
    """Minibatches from an :class:`OnDiskMatrix`, shuffled within and across chunks of rows.

    The file's rows are cut into chunks of ``chunk_rows`` consecutive rows. Each epoch the chunks
    holding rows to visit (``indices``) are taken in an order drawn from ``(seed, epoch)``,
    ``chunks_in_memory`` at a time; those are read (one contiguous slice per chunk, in file order)
    and their rows shuffled together and cut into minibatches (a batch may span two reads). At most
    ``chunk_rows * chunks_in_memory`` rows are in memory at once. When that covers every row, the
    order equals :class:`~genailab.data.loader.MinibatchLoader`'s for the same seed, epoch and
    (sorted) indices. Without ``shuffle`` the rows come in the order of ``indices``. Parameters and
    batches are otherwise those of ``MinibatchLoader``.
    """

    def __init__(
        self,
        matrix: OnDiskMatrix,
        conditions: np.ndarray | None = None,
        *,
        labels: np.ndarray | None = None,
        indices: np.ndarray | None = None,
        batch_size: int = 128,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        sparse_counts: bool = True,
        chunk_rows: int = CHUNK_ROWS,
        chunks_in_memory: int = CHUNKS_IN_MEMORY,
    ):
        if min(batch_size, chunk_rows, chunks_in_memory) < 1:
            raise ConfigError(
                f"batch_size ({batch_size}), chunk_rows ({chunk_rows}) and chunks_in_memory ({chunks_in_memory}) "
                "must be positive."
            )
        self.matrix = matrix
        self.conditions = None if conditions is None else np.ascontiguousarray(conditions, dtype=np.float32)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.indices = np.arange(matrix.shape[0]) if indices is None else np.asarray(indices, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.sparse_counts = sparse_counts
        self.chunk_rows = chunk_rows
        self.chunks_in_memory = chunks_in_memory
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.indices.size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _reads(self) -> list[np.ndarray]:
        """The rows of each group of chunks read together, in visiting order."""
        if not self.shuffle:
            size = self.chunk_rows * self.chunks_in_memory
            return [self.indices[i : i + size] for i in range(0, self.indices.size, size)]
        if not self.indices.size:
            return []
        chunks = _by_block(np.sort(self.indices), self.chunk_rows)
        chunk_order = np.random.default_rng([self.seed, self.epoch, 1]).permutation(len(chunks))
        rng = np.random.default_rng([self.seed, self.epoch])  # MinibatchLoader's stream, for a single read
        group = self.chunks_in_memory
        return [
            rng.permutation(np.concatenate([chunks[c] for c in np.sort(chunk_order[i : i + group])]))
            for i in range(0, len(chunks), group)
        ]

    def order(self) -> np.ndarray:
        """The rows of this epoch in visiting order."""
        reads = self._reads()
        return np.concatenate(reads) if reads else self.indices

    def __iter__(self) -> Iterator[Batch]:
        rows_part, x_part, n_part = [], [], 0  # the batch being filled, possibly across two reads
        for rows in self._reads():
            block, position = self._read(rows)
            start = 0
            while start < rows.size:
                take = min(self.batch_size - n_part, rows.size - start)
                rows_part.append(rows[start : start + take])
                x_part.append(block[position[start : start + take]])
                n_part += take
                start += take
                if n_part == self.batch_size:
                    yield self._batch(np.concatenate(rows_part), x_part)
                    rows_part, x_part, n_part = [], [], 0
        if n_part and not self.drop_last:
            yield self._batch(np.concatenate(rows_part), x_part)

    def _read(self, rows: np.ndarray):
        """``rows`` as one block in ascending row order, and where each of ``rows`` sits in it."""
        ordered = np.sort(rows)
        parts = [
            self.matrix.read(int(chunk[0]), int(chunk[-1]) + 1)[chunk - chunk[0]]
            for chunk in _by_block(ordered, self.chunk_rows)
        ]
        block = sp.vstack(parts, format="csr") if sp.issparse(parts[0]) else np.concatenate(parts)
        return block, np.searchsorted(ordered, rows)

    def _batch(self, rows: np.ndarray, x_parts: list) -> Batch:
        """The batch of ``rows`` from their rows of the blocks read, in order (one or two parts)."""
        if len(x_parts) == 1:
            parts = x_parts[0]
        else:
            parts = sp.vstack(x_parts, format="csr") if sp.issparse(x_parts[0]) else np.concatenate(x_parts)
        if self.sparse_counts:
            x, x_sparse = gather_rows(parts, np.arange(rows.size), with_sparse=True)
        else:
            x, x_sparse = gather_rows(parts, np.arange(rows.size)), None
        c = None if self.conditions is None else torch.from_numpy(self.conditions[rows])
        y = None if self.labels is None else torch.from_numpy(self.labels[rows])
        return Batch(x=torch.from_numpy(x), c=c, index=torch.from_numpy(rows), y=y, x_sparse=x_sparse)


def _by_block(rows: np.ndarray, block_rows: int) -> list[np.ndarray]:
    """Sorted ``rows`` split by the block of ``block_rows`` file rows they fall in (one read each)."""
    return np.split(rows, np.flatnonzero(np.diff(rows // block_rows)) + 1)


def minibatch_loader(
    matrix, conditions: np.ndarray | None = None, *, chunk_rows: int = CHUNK_ROWS,
    chunks_in_memory: int = CHUNKS_IN_MEMORY, **options,
) -> MinibatchLoader | ChunkedLoader:
    """A :class:`ChunkedLoader` for an :class:`OnDiskMatrix`, else a ``MinibatchLoader``; the chunk
    options apply to the first only, ``options`` to both."""
    if isinstance(matrix, OnDiskMatrix):
        return ChunkedLoader(matrix, conditions, chunk_rows=chunk_rows, chunks_in_memory=chunks_in_memory, **options)
    return MinibatchLoader(matrix, conditions, **options)
