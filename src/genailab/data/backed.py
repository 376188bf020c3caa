"""Out-of-core minibatches from a backed h5ad (``anndata.read_h5ad(path, backed="r")``).

The matrix stays on disk. :class:`OnDiskMatrix` is a row source for
:class:`~genailab.data.loader.MinibatchLoader`: it reads contiguous row ranges with one slice of
each stored array (``X/indptr``, ``X/indices``, ``X/data``, or the dense array), one range per chunk
of rows, so one epoch reads every row exactly once and never the whole matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import h5py
import numpy as np
import scipy.sparse as sp
from anndata.abc import CSCDataset, CSRDataset

from genailab.data.loader import LoaderOptions, _by_block
from genailab.data.sparse_structure import check_indices, check_indptr
from genailab.errors import InputDataError

_BACKED = "The backed h5ad's X"  # how errors name the matrix on disk
SCAN_ROWS = 8192  # rows per read when a whole matrix is scanned (validation, cell totals, hashing)
CHUNK_ROWS = LoaderOptions.chunk_rows  # default rows per contiguous read while training
CHUNKS_IN_MEMORY = LoaderOptions.chunks_in_memory  # default chunks read together and shuffled row by row


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

    in_memory = False  # the loader reads it chunk by chunk

    def __init__(self, source, *, transform: Callable | None = None):
        if isinstance(source, CSCDataset):
            raise InputDataError(
                "The backed matrix is stored as CSC (by genes), which cannot be read cell by cell; rewrite it as "
                "CSR: adata = anndata.read_h5ad(path); adata.X = adata.X.tocsr(); adata.write_h5ad(path)."
            )
        if isinstance(source, CSRDataset):
            group = source.group
            if group["indptr"].shape[0] != source.shape[0] + 1 or group["indices"].shape != group["data"].shape:
                raise InputDataError(
                    f"{_BACKED} is a damaged sparse matrix: indptr has {group['indptr'].shape[0]} entries for "
                    f"{source.shape[0]} rows and {group['indices'].shape[0]} indices go with {group['data'].shape[0]} "
                    "values. The file was probably corrupted; re-create it from a good copy."
                )
        self.source = source
        self.transform = transform
        self.shape = (int(source.shape[0]), self.read(0, 0).shape[1])

    def read(self, start: int, stop: int):
        """Rows ``start:stop``, read with one slice of each stored array."""
        return self.read_ranges([(start, stop)])

    def read_ranges(self, ranges: list[tuple[int, int]]):
        """The rows of several ``(start, stop)`` ranges, one range below the other, as one block: one
        slice of each stored array per range, written straight into the block's arrays."""
        if isinstance(self.source, h5py.Dataset):
            block = np.concatenate([np.asarray(self.source[start:stop], dtype=np.float32) for start, stop in ranges])
        else:
            group = self.source.group
            pointers = [group["indptr"][start : stop + 1].astype(np.int64) for start, stop in ranges]
            for (start, stop), pointer in zip(ranges, pointers):  # damaged pointers would size the arrays wrongly
                check_indptr(pointer, n_major=stop - start, n_stored=group["indices"].shape[0], source=_BACKED,
                             first_row=start)
            sizes = [int(pointer[-1] - pointer[0]) for pointer in pointers]
            index_dtype = np.int32 if sum(sizes) < np.iinfo(np.int32).max else np.int64
            values = np.empty(sum(sizes), dtype=np.float32)
            indices = np.empty(sum(sizes), dtype=index_dtype)
            indptr = np.zeros(sum(stop - start for start, stop in ranges) + 1, dtype=index_dtype)
            at, row = 0, 0
            for (start, _), pointer, size in zip(ranges, pointers, sizes):
                lo = int(pointer[0])
                _read_into(group["data"], lo, lo + size, values, at)
                _read_into(group["indices"], lo, lo + size, indices, at)
                check_indices(indices, pointer - lo + at, n_minor=self.source.shape[1], source=_BACKED, first_row=start)
                indptr[row + 1 : row + pointer.size] = pointer[1:] - lo + at
                at, row = at + size, row + pointer.size - 1
            block = sp.csr_matrix((values, indices, indptr), shape=(row, self.source.shape[1]))
        return block if self.transform is None else self.transform(block)

    def hold(self, rows: np.ndarray, chunk_rows: int = CHUNK_ROWS):
        """(a block holding ``rows``, where each of ``rows`` sits in it): one contiguous read per
        chunk of ``chunk_rows`` file rows that ``rows`` touch, in file order. Minibatches are then
        gathered from the block (reordering the whole block at once is slower: it misses the cache)."""
        ordered = np.sort(rows)
        chunks = _by_block(ordered, chunk_rows)
        block = self.read_ranges([(int(chunk[0]), int(chunk[-1]) + 1) for chunk in chunks])
        starts = np.cumsum([0] + [int(chunk[-1] - chunk[0]) + 1 for chunk in chunks[:-1]])
        in_block = np.concatenate([chunk - chunk[0] + start for chunk, start in zip(chunks, starts)])  # of ``ordered``
        return block, in_block[np.searchsorted(ordered, rows)]

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


def _read_into(dataset, start: int, stop: int, out: np.ndarray, at: int) -> None:
    """``dataset[start:stop]`` into ``out[at:]`` (h5py reads it in place, converting the type)."""
    if stop <= start:
        return
    if isinstance(dataset, h5py.Dataset):
        dataset.read_direct(out[at : at + stop - start], np.s_[start:stop])  # a view: h5py's fast path
    else:
        out[at : at + stop - start] = dataset[start:stop]
