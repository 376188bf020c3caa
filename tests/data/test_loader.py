"""Minibatches from CSR: exact rows, no full densification, seeded per-epoch order."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from genailab.data.loader import LoaderOptions, MinibatchLoader, gather_rows, stack_csr
from genailab.errors import ConfigError


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_gather_rows_matches_dense_rows(fmt):
    rng = np.random.default_rng(0)
    dense = (rng.random((50, 17)) < 0.2) * rng.integers(1, 9, (50, 17))
    dense[7] = 0  # an empty row
    matrix = sp.csr_matrix(dense) if fmt == "csr" else sp.csc_matrix(dense) if fmt == "csc" else dense
    rows = np.array([7, 3, 3, 49, 0])
    out = gather_rows(matrix, rows)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, dense[rows])
    batch = MinibatchLoader(matrix, batch_size=4).batch(rows)
    x_sparse = batch.x_sparse
    if fmt == "dense":
        assert x_sparse is None
    else:  # exactly the non-zero entries, row by row; the dense rows are built only when read
        assert batch._x is None
        rebuilt = sp.csr_matrix((x_sparse.counts.numpy(), x_sparse.genes.numpy(), x_sparse.row_starts.numpy()), shape=out.shape)
        np.testing.assert_array_equal(rebuilt.toarray(), out)
        np.testing.assert_array_equal(x_sparse.to_dense(out.shape[1]).numpy(), out)
        assert x_sparse.counts.dtype == torch.float32 and (x_sparse.counts != 0).all()
    np.testing.assert_array_equal(batch.x.numpy(), out)


def test_the_stored_entries_come_with_the_batch_unless_declined():
    matrix = sp.random(30, 8, density=0.4, format="csr", dtype=np.float32, random_state=1)
    batch = next(iter(MinibatchLoader(matrix, batch_size=10, seed=3)))
    rows, genes = batch.x.nonzero(as_tuple=True)
    np.testing.assert_array_equal(batch.x_sparse.genes.numpy(), genes.numpy())
    np.testing.assert_array_equal(batch.x_sparse.counts.numpy(), batch.x[rows, genes].numpy())
    assert next(iter(MinibatchLoader(matrix, batch_size=10, seed=3, sparse_counts=False))).x_sparse is None


def test_loader_never_densifies_a_huge_matrix():
    # 2e6 x 5e4 would be 400 GB dense; a batch of 64 rows is 12.8 MB.
    n, g = 2_000_000, 50_000
    matrix = sp.csr_matrix((np.ones(3, np.float32), (np.array([0, 5, 1_999_999]), np.array([1, 2, 49_999]))), shape=(n, g))
    loader = MinibatchLoader(matrix, batch_size=64, seed=0)
    batch = loader.batch(np.array([1_999_999, 5]))
    assert batch.x.shape == (2, g) and batch.x[0, 49_999] == 1 and batch.x[1, 2] == 1


def test_epoch_order_depends_only_on_seed_and_epoch():
    matrix = sp.random(40, 5, density=0.3, format="csr", dtype=np.float32, random_state=0)
    a = MinibatchLoader(matrix, batch_size=8, seed=1)
    b = MinibatchLoader(matrix, batch_size=8, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    np.testing.assert_array_equal(a.order(), b.order())
    b.set_epoch(4)
    assert not np.array_equal(a.order(), b.order())
    seen = np.concatenate([batch.index.numpy() for batch in a])
    assert sorted(seen) == list(range(40))
    conditions = np.arange(40, dtype=np.float32)[:, None]
    batch = next(iter(MinibatchLoader(matrix, conditions, batch_size=8, seed=1)))
    np.testing.assert_array_equal(batch.c.numpy()[:, 0], batch.index.numpy())


def test_drop_last_and_length():
    matrix = np.zeros((33, 4), np.float32)
    assert len(MinibatchLoader(matrix, batch_size=8)) == 5
    assert len(MinibatchLoader(matrix, batch_size=8, drop_last=True)) == 4


def test_stacked_csr_blocks_equal_scipy_vstack():
    blocks = [sp.random(n, 9, density=0.3, format="csr", dtype=np.float32, random_state=n) for n in (4, 0, 7)]
    stacked = stack_csr(blocks)
    expected = sp.vstack(blocks, format="csr")
    assert stacked.shape == expected.shape
    np.testing.assert_array_equal(stacked.indptr, expected.indptr)
    np.testing.assert_array_equal(stacked.toarray(), expected.toarray())


def test_loader_options_are_split_from_training_options_and_checked():
    options, rest = LoaderOptions.split({"chunk_rows": 64, "epochs": 3, "lr": 1e-3})
    assert options == LoaderOptions(chunk_rows=64) and rest == {"epochs": 3, "lr": 1e-3}
    assert options.chunks_in_memory == LoaderOptions().chunks_in_memory
    with pytest.raises(ConfigError, match="chunks_in_memory must be a positive whole number"):
        LoaderOptions(chunks_in_memory=0)
    with pytest.raises(ConfigError, match="either options=LoaderOptions"):
        MinibatchLoader(np.zeros((4, 2)), options=LoaderOptions(), chunk_rows=8)
    assert MinibatchLoader(np.zeros((4, 2)), chunk_rows=8).options == LoaderOptions(chunk_rows=8)


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_rows_gathered_on_the_device_equal_the_host_batches(fmt):
    """The device gather (run here on the CPU, the same torch code) rebuilds the exact rows."""
    from genailab.data.loader import DeviceRows

    rng = np.random.default_rng(0)
    dense = ((rng.random((70, 13)) < 0.3) * rng.integers(1, 50, (70, 13))).astype(np.float32)
    dense[5] = 0  # an empty row
    matrix = sp.csr_matrix(dense) if fmt == "csr" else dense
    conditions, labels = rng.random((70, 2)).astype(np.float32), np.arange(70) % 3
    host = MinibatchLoader(matrix, conditions, labels=labels, batch_size=16, seed=4, drop_last=True)
    host.set_epoch(2)
    device = DeviceRows(matrix, host.conditions, host.labels, torch.device("cpu"))
    pairs = list(zip(device.batches(host.order(), 16, True), host, strict=True))
    assert len(pairs) == 4
    for a, b in pairs:
        np.testing.assert_array_equal(a.index.numpy(), b.index.numpy())
        np.testing.assert_array_equal(a.x.numpy(), b.x.numpy())
        np.testing.assert_array_equal(a.c.numpy(), b.c.numpy())
        np.testing.assert_array_equal(a.y.numpy(), b.y.numpy())
    assert DeviceRows.nbytes(sp.csr_matrix(dense)) == 12 * int((dense != 0).sum()) + 8 * 71
    assert not host.preload(torch.device("cpu"))  # only accelerators take a copy
