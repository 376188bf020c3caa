"""One minibatch loader over a row source: an in-memory CSR or dense matrix, or a backed h5ad read
in chunks (:class:`~genailab.data.backed.OnDiskMatrix`); the whole matrix is never densified.

Each epoch the loader draws a visiting order from ``(seed, epoch)``. For an in-memory source every
row is held, so the order is one permutation of the rows. For an on-disk source the rows are cut
into chunks of ``chunk_rows`` consecutive file rows; the chunks are visited in a shuffled order,
``chunks_in_memory`` at a time, and the rows of the chunks held together are shuffled among
themselves (a minibatch may span two such reads). When one read covers every row, the on-disk
order equals the in-memory one, so training gives the same numbers either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import scipy.sparse as sp
import torch

from genailab.checks import check_number
from genailab.errors import ConfigError
from genailab.likelihood.sparse_counts import SparseCounts


class Batch:
    """One minibatch of B cells.

    ``x`` (B, G) float32 expression; ``c`` (B, raw_condition_dim) float32 conditions or None;
    ``index`` (B,) int64 row numbers in the source matrix; ``y`` (B,) int64 labels for an auxiliary
    head (batch codes for the adversary) or None; ``x_sparse`` the stored entries of x
    (:class:`SparseCounts`) when the source matrix is sparse. A batch cut from a sparse matrix
    holds its rows (``rows``, CSR) and builds the dense ``x`` on first use only, so inference that
    reads the stored entries alone (the encoder's sparse first layer) never densifies.
    """

    def __init__(
        self,
        x: torch.Tensor | None,
        c: torch.Tensor | None,
        index: torch.Tensor,
        y: torch.Tensor | None = None,
        x_sparse: SparseCounts | None = None,
        *,
        rows: sp.csr_matrix | None = None,
    ):
        if x is None and rows is None:
            raise ValueError("Batch needs x or its rows as a CSR matrix.")
        self._x, self._rows = x, rows
        self.c, self.index, self.y, self.x_sparse = c, index, y, x_sparse

    @property
    def x(self) -> torch.Tensor:
        if self._x is None:
            self._x = torch.from_numpy(self._rows.toarray())
            self._rows = None
        return self._x

    def to(self, device: torch.device) -> Batch:
        if device.type == "cpu" or self.x.device == device:
            return self
        return Batch(
            x=self.x.to(device, non_blocking=True),
            c=None if self.c is None else self.c.to(device, non_blocking=True),
            index=self.index,
            y=None if self.y is None else self.y.to(device, non_blocking=True),
            x_sparse=None,  # the count likelihood uses it on the CPU only
        )


@dataclass(frozen=True)
class LoaderOptions:
    """How minibatches are read from an on-disk (backed h5ad) row source; in memory they change nothing."""

    chunk_rows: int = 2048  # consecutive file rows per disk read; the chunks' visiting order is shuffled
    chunks_in_memory: int = 8  # chunks held and shuffled together: the loader's memory, in rows chunk_rows * this

    def __post_init__(self) -> None:
        for name in ("chunk_rows", "chunks_in_memory"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive whole number, got {value!r}.")

    @classmethod
    def split(cls, options: dict) -> tuple[LoaderOptions, dict]:
        """(the loader options among ``options``, the remaining options), e.g. to route ``fit(**options)``."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names}), {k: v for k, v in options.items() if k not in names}


class InMemoryRows:
    """A CSR or dense (n_cells, n_genes) matrix as a row source: every row is already held."""

    in_memory = True

    def __init__(self, matrix):
        if sp.issparse(matrix) and not sp.isspmatrix_csr(matrix):
            matrix = sp.csr_matrix(matrix)
        self.matrix = matrix
        self.shape = matrix.shape

    def hold(self, rows: np.ndarray, chunk_rows: int | None = None):
        """(a matrix holding ``rows``, their positions in it): here the matrix itself, no copy."""
        return self.matrix, rows


class DeviceRows:
    """An in-memory CSR or dense matrix copied once to a device (a GPU), with minibatches gathered
    there: no host-to-device copy of the expression per step and no synchronisation (the host
    knows each batch's number of stored entries from its own copy of the row pointers).

    Parameters
    ----------
    matrix
        (n_cells, n_genes) CSR or dense matrix.
    conditions, labels
        As for :class:`MinibatchLoader`; copied alongside.
    device
        Where to keep them.
    """

    def __init__(self, matrix, conditions: np.ndarray | None, labels: np.ndarray | None, device: torch.device):
        self.device = device
        self.sparse = sp.issparse(matrix)
        if self.sparse:
            matrix = matrix.tocsr() if matrix.format != "csr" else matrix
            self.indptr = np.asarray(matrix.indptr, dtype=np.int64)
            self.indptr_device = torch.from_numpy(self.indptr).to(device)
            self.indices = torch.from_numpy(np.asarray(matrix.indices, dtype=np.int64)).to(device)
            self.values = torch.from_numpy(np.asarray(matrix.data, dtype=np.float32)).to(device)
        else:
            self.dense = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32)).to(device)
        self.n_genes = matrix.shape[1]
        self.conditions = None if conditions is None else torch.from_numpy(conditions).to(device)
        self.labels = None if labels is None else torch.from_numpy(labels).to(device)

    @staticmethod
    def nbytes(matrix) -> int:
        """Device bytes needed for ``matrix`` (values, int64 column indices and row pointers, or dense)."""
        if sp.issparse(matrix):
            return 12 * int(matrix.nnz) + 8 * (matrix.shape[0] + 1)
        return 4 * int(np.prod(matrix.shape))

    def batches(self, order: np.ndarray, batch_size: int, drop_last: bool) -> Iterator[Batch]:
        """Minibatches of ``order`` (host row numbers), gathered on the device."""
        order_device = torch.from_numpy(np.ascontiguousarray(order, dtype=np.int64)).to(self.device)  # one copy per epoch
        n_batches = order.size // batch_size if drop_last else -(-order.size // batch_size)
        for i in range(n_batches):
            rows, rows_device = order[i * batch_size : (i + 1) * batch_size], order_device[i * batch_size : (i + 1) * batch_size]
            x = self._rows(rows, rows_device)
            c = None if self.conditions is None else self.conditions.index_select(0, rows_device)
            y = None if self.labels is None else self.labels.index_select(0, rows_device)
            yield Batch(x=x, c=c, index=torch.from_numpy(rows), y=y)

    def _rows(self, rows: np.ndarray, rows_device: torch.Tensor) -> torch.Tensor:
        """Dense (len(rows), n_genes) float32 rows on the device."""
        if not self.sparse:
            return self.dense.index_select(0, rows_device)
        nnz = int((self.indptr[rows + 1] - self.indptr[rows]).sum())  # from the host's row pointers: no sync
        starts = self.indptr_device.index_select(0, rows_device)
        lengths = self.indptr_device.index_select(0, rows_device + 1) - starts
        which_row = torch.repeat_interleave(torch.arange(rows.size, device=self.device), lengths, output_size=nnz)
        first_of_row = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths, output_size=nnz)
        source = starts.index_select(0, which_row) + torch.arange(nnz, device=self.device) - first_of_row  # (nnz,)
        x = torch.zeros(rows.size, self.n_genes, device=self.device)
        x[which_row, self.indices.index_select(0, source)] = self.values.index_select(0, source)
        return x


def row_indices(indices, n_rows: int, *, argument: str = "indices") -> np.ndarray:
    """``indices`` as int64 row positions, (k,): integer positions (kept in their order), or a
    boolean mask with one entry per row (its True rows); None is every row. Anything else, and
    positions outside ``0..n_rows - 1``, is a :class:`ConfigError` naming ``argument``."""
    if indices is None:
        return np.arange(n_rows)
    values = np.asarray(indices)
    if values.ndim != 1:
        raise ConfigError(f"`{argument}` must be a 1-D array of row positions or a boolean mask; got shape {values.shape}.")
    if values.dtype == bool:
        if values.size != n_rows:
            raise ConfigError(
                f"`{argument}` is a boolean mask of {values.size} entries for {n_rows} cells; give one entry per cell "
                "(e.g. adata.obs[...] == value), or integer row positions."
            )
        return np.flatnonzero(values)
    if values.size == 0:
        return np.empty(0, dtype=np.int64)
    if not np.issubdtype(values.dtype, np.integer):
        raise ConfigError(
            f"`{argument}` must be integer row positions or a boolean mask, not {values.dtype} values (e.g. "
            f"{np.asarray(values[0]).item()!r}); for cell names use adata.obs_names.get_indexer(names)."
        )
    if values.min() < 0 or values.max() >= n_rows:
        raise ConfigError(f"`{argument}` must lie in 0..{n_rows - 1} (rows of the data); got {values.min()}..{values.max()}.")
    return values.astype(np.int64, copy=False)


def row_source(matrix):
    """``matrix`` as a row source: an :class:`~genailab.data.backed.OnDiskMatrix` (anything with
    ``hold``) stays as it is, an in-memory CSR or dense matrix becomes :class:`InMemoryRows`."""
    return matrix if hasattr(matrix, "hold") else InMemoryRows(matrix)


def gather_rows(matrix, rows: np.ndarray | slice):
    """Rows of a CSR or dense matrix as a dense float32 array (len(rows), n_cols); ``rows`` are
    row numbers or a slice. For CSR, scipy's compiled row indexing and densification do the
    work (no Python loop per row)."""
    if not sp.issparse(matrix):
        return np.asarray(matrix[rows], dtype=np.float32)
    return _csr_rows(matrix, rows).toarray()


def _csr_rows(matrix, rows: np.ndarray | slice) -> sp.csr_matrix:
    """Rows of a sparse matrix as float32 CSR."""
    selected = matrix[rows]
    if selected.format != "csr":  # e.g. CSC or COO input
        selected = selected.tocsr()
    return selected.astype(np.float32, copy=False)


class MinibatchLoader:
    """Iterate over cells in minibatches, reshuffled each epoch from ``(seed, epoch)``.

    Parameters
    ----------
    matrix
        (n_cells, n_genes) row source: a CSR or dense matrix in memory, or an
        :class:`~genailab.data.backed.OnDiskMatrix` over a backed h5ad.
    conditions
        (n_cells, k) float32 condition matrix, or None.
    labels
        (n_cells,) integer labels carried as ``Batch.y`` (e.g. batch codes for an adversary), or None.
    indices
        Rows to iterate over (e.g. the training split); all rows by default.
    batch_size, shuffle, seed, drop_last
        Usual meanings; the order of epoch e depends only on (seed, e), so a resumed run sees the
        same batches as an uninterrupted one. Without ``shuffle`` rows come in the order of ``indices``.
    sparse_counts
        Also hand over each batch's stored entries (``Batch.x_sparse``), which the count
        likelihood uses; inference that only encodes or decodes can skip them.
    options
        Chunked reading of an on-disk source (:class:`LoaderOptions`); ``chunk_rows`` and
        ``chunks_in_memory`` may also be given directly.
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
        options: LoaderOptions | None = None,
        chunk_rows: int | None = None,
        chunks_in_memory: int | None = None,
    ):
        batch_size = int(check_number("batch_size", batch_size, integer=True, ge=1))
        given = {k: v for k, v in (("chunk_rows", chunk_rows), ("chunks_in_memory", chunks_in_memory)) if v is not None}
        if options is not None and given:
            raise ConfigError("Pass either options=LoaderOptions(...) or chunk_rows/chunks_in_memory, not both.")
        self.options = options or LoaderOptions(**given)
        self.source = row_source(matrix)
        n_rows = self.source.shape[0]
        self.conditions = None if conditions is None else np.ascontiguousarray(conditions, dtype=np.float32)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.indices = row_indices(indices, n_rows)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.sparse_counts = sparse_counts
        self.epoch = 0
        self._on_device: DeviceRows | None = None  # set by preload()

    @property
    def matrix(self):
        """The source matrix (in memory) or :class:`~genailab.data.backed.OnDiskMatrix`."""
        return self.source.matrix if isinstance(self.source, InMemoryRows) else self.source

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def preload(self, device: torch.device, *, max_fraction: float = 0.5) -> bool:
        """Copy an in-memory source to ``device`` when it takes at most ``max_fraction`` of the
        device's free memory, so batches are then gathered there; returns whether it did. Later
        batches are then on ``device`` and carry no sparse entries (their use is CPU-only)."""
        if device.type != "cuda" or not isinstance(self.source, InMemoryRows):
            return False
        if DeviceRows.nbytes(self.source.matrix) > max_fraction * torch.cuda.mem_get_info(device)[0]:
            return False
        self._on_device = DeviceRows(self.source.matrix, self.conditions, self.labels, device)
        return True

    def __len__(self) -> int:
        n = self.indices.size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _reads(self) -> list[np.ndarray]:
        """The rows held together, read by read, each in visiting order."""
        rows_per_read = self.indices.size if self.source.in_memory else self.options.chunk_rows * self.options.chunks_in_memory
        if not self.indices.size:
            return []
        if not self.shuffle:
            if self.source.in_memory:
                return [self.indices]
            chunk = self.indices // self.options.chunk_rows
            if np.all(np.diff(chunk) >= 0):
                # rows in file order (a validation split, all cells): ``chunks_in_memory`` chunks of the
                # file per read, as in training, however sparsely the rows sit in them
                read = np.cumsum(np.concatenate([[0], np.diff(chunk) != 0])) // self.options.chunks_in_memory
                return np.split(self.indices, np.flatnonzero(np.diff(read)) + 1)
            return [self.indices[i : i + rows_per_read] for i in range(0, self.indices.size, rows_per_read)]
        rng = np.random.default_rng([self.seed, self.epoch])
        ordered = np.sort(self.indices)
        if rows_per_read >= self.indices.size:
            return [rng.permutation(ordered)]
        chunks = _by_block(ordered, self.options.chunk_rows)
        chunk_order = np.random.default_rng([self.seed, self.epoch, 1]).permutation(len(chunks))
        group = self.options.chunks_in_memory
        return [
            rng.permutation(np.concatenate([chunks[c] for c in np.sort(chunk_order[i : i + group])]))
            for i in range(0, len(chunks), group)
        ]

    def order(self) -> np.ndarray:
        """The rows of this epoch in visiting order."""
        reads = self._reads()
        return np.concatenate(reads) if reads else self.indices

    def __iter__(self) -> Iterator[Batch]:
        if self._on_device is not None:
            yield from self._on_device.batches(self.order(), self.batch_size, self.drop_last)
            return
        rows_part, x_part, n_part = [], [], 0  # the batch being filled, possibly across two reads
        for rows in self._reads():
            held, position = self.source.hold(rows, self.options.chunk_rows)
            start = 0
            while start < rows.size:
                take = min(self.batch_size - n_part, rows.size - start)
                rows_part.append(rows[start : start + take])
                x_part.append((held, position[start : start + take]))
                n_part += take
                start += take
                if n_part == self.batch_size:
                    yield self._batch(np.concatenate(rows_part), x_part)
                    rows_part, x_part, n_part = [], [], 0
        if n_part and not self.drop_last:
            yield self._batch(np.concatenate(rows_part), x_part)

    def batch(self, rows: np.ndarray) -> Batch:
        """The :class:`Batch` for the given row numbers."""
        rows = np.asarray(rows, dtype=np.int64)
        return self._batch(rows, [self.source.hold(rows, self.options.chunk_rows)])

    def _batch(self, rows: np.ndarray, parts: list) -> Batch:
        """The batch of ``rows`` from (held matrix, positions) parts, in order (one, or two across reads)."""
        if len(parts) == 1:
            held, position = parts[0]
        else:
            blocks = [held[position] for held, position in parts]
            held = stack_csr(blocks) if sp.issparse(blocks[0]) else np.concatenate(blocks)
            position = slice(None)
        c = None if self.conditions is None else torch.from_numpy(self.conditions[rows])
        y = None if self.labels is None else torch.from_numpy(self.labels[rows])
        if not sp.issparse(held):
            return Batch(torch.from_numpy(gather_rows(held, position)), c, torch.from_numpy(rows), y)
        selected = _csr_rows(held, position)  # densified when x is first read
        x_sparse = SparseCounts.from_scipy(selected) if self.sparse_counts else None
        return Batch(None, c, torch.from_numpy(rows), y, x_sparse, rows=selected)


def stack_csr(parts: list[sp.csr_matrix]) -> sp.csr_matrix:
    """CSR blocks of equal width one above the other, by concatenating their arrays (several
    times faster than ``scipy.sparse.vstack``, which converts index types block by block)."""
    if len(parts) == 1:
        return parts[0]
    lengths = np.concatenate([np.diff(part.indptr) for part in parts])
    indptr = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    data = np.concatenate([part.data for part in parts])
    indices = np.concatenate([part.indices for part in parts])
    return sp.csr_matrix((data, indices, indptr), shape=(lengths.size, parts[0].shape[1]))


def _by_block(rows: np.ndarray, block_rows: int) -> list[np.ndarray]:
    """Sorted ``rows`` split by the block of ``block_rows`` file rows they fall in (one read each)."""
    return np.split(rows, np.flatnonzero(np.diff(rows // block_rows)) + 1)
