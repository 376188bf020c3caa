"""Out-of-core training from a backed h5ad: same numbers as in memory, every cell once, bounded reads."""

from __future__ import annotations

import tracemalloc

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import genailab
from genailab.data.backed import OnDiskMatrix
from genailab.data.loader import MinibatchLoader
from genailab.data.simulate import write_simulated_h5ad
from genailab.errors import InputDataError
from genailab.train.trainer import elbo_terms

MODEL = dict(likelihood="nb", condition_keys=["batch"], latent_dim=4, hidden_dims=(32,))
FIT = dict(epochs=2, batch_size=64, kl_warmup_epochs=1, seed=0, progress=False)


def _counts_only(adata):
    """The counts in X with obs and var: what a backed file holds."""
    return ad.AnnData(X=adata.X.copy(), obs=adata.obs.copy(), var=adata.var[[]].copy())


@pytest.fixture(scope="module")
def pair(sim_adata, tmp_path_factory):
    """(in-memory AnnData, the same data opened backed)."""
    memory = _counts_only(sim_adata)
    path = tmp_path_factory.mktemp("backed") / "sim.h5ad"
    memory.write_h5ad(path)
    return memory, ad.read_h5ad(path, backed="r")


@pytest.fixture(scope="module")
def trained(pair):
    """A model trained in memory with MODEL and FIT."""
    return genailab.VAE(pair[0], **MODEL).fit(**FIT, chunk_rows=10**6)


def _recorded_reads(matrix: OnDiskMatrix) -> list[tuple[int, int]]:
    """Every row range the matrix reads from now on (each is one slice of each stored array)."""
    reads, read_ranges = [], matrix.read_ranges

    def spy(ranges):
        reads.extend(ranges)
        return read_ranges(ranges)

    matrix.read_ranges = spy
    return reads


def test_every_cell_once_with_its_conditions_shuffled_across_chunks(pair):
    memory, backed = pair
    matrix = OnDiskMatrix(backed.X)
    conditions = np.arange(memory.n_obs, dtype=np.float32)[:, None]
    labels = np.arange(memory.n_obs) % 7
    loader = MinibatchLoader(matrix, conditions, labels=labels, batch_size=50, chunk_rows=40, chunks_in_memory=3, seed=2)
    loader.set_epoch(1)
    batches = list(loader)
    seen = np.concatenate([b.index.numpy() for b in batches])
    assert len(batches) == len(loader) == 12 and sorted(seen) == list(range(memory.n_obs))
    np.testing.assert_array_equal(seen, loader.order())
    for b in batches:
        rows = b.index.numpy()
        np.testing.assert_array_equal(b.x.numpy(), memory.X[rows].toarray())
        np.testing.assert_array_equal(b.c.numpy()[:, 0], rows)
        np.testing.assert_array_equal(b.y.numpy(), labels[rows])
    chunks = seen // 40
    first_read = set(chunks[:120])
    assert len(first_read) == 3 and first_read != {0, 1, 2}  # chunks come in a shuffled order...
    assert len(set(chunks[:50])) > 1  # ...and one batch mixes the chunks read together
    loader.set_epoch(2)
    assert not np.array_equal(loader.order(), seen)  # a new order every epoch
    loader.set_epoch(1)
    np.testing.assert_array_equal(loader.order(), seen)  # fixed by (seed, epoch)


def test_one_read_covering_all_rows_gives_the_in_memory_order(pair):
    memory, backed = pair
    rows = np.arange(0, memory.n_obs, 3)
    chunked = MinibatchLoader(OnDiskMatrix(backed.X), indices=rows, batch_size=32, chunk_rows=100, chunks_in_memory=6, seed=5)
    in_memory = MinibatchLoader(memory.X, indices=rows, batch_size=32, seed=5)
    for epoch in (0, 3):
        chunked.set_epoch(epoch)
        in_memory.set_epoch(epoch)
        for a, b in zip(chunked, in_memory, strict=True):
            np.testing.assert_array_equal(a.index.numpy(), b.index.numpy())
            np.testing.assert_array_equal(a.x.numpy(), b.x.numpy())
            for mine, theirs in zip(a.x_sparse, b.x_sparse, strict=True):  # the same stored entries
                np.testing.assert_array_equal(mine.numpy(), theirs.numpy())


def test_reads_are_single_slices_of_at_most_one_chunk(pair):
    _, backed = pair
    matrix = OnDiskMatrix(backed.X)
    reads = _recorded_reads(matrix)
    loader = MinibatchLoader(matrix, batch_size=16, chunk_rows=64, chunks_in_memory=2, seed=0)
    n_batches = sum(1 for _ in loader)
    sizes = [stop - start for start, stop in reads]
    assert n_batches == len(loader) and sum(sizes) == matrix.shape[0]  # every row read once per epoch
    assert max(sizes) <= 64 and all(start // 64 == (stop - 1) // 64 for start, stop in reads)


def test_an_epoch_holds_a_small_part_of_the_matrix(tmp_path):
    path = write_simulated_h5ad(tmp_path / "big.h5ad", 8192, 400, chunk_size=4096, seed=0)
    backed = ad.read_h5ad(path, backed="r")
    nbytes = backed.X.group["data"].size * 8  # values and column indices, as CSR in memory
    loader = MinibatchLoader(OnDiskMatrix(backed.X), batch_size=64, chunk_rows=128, chunks_in_memory=2, seed=0)
    held = nbytes * 256 / 8192  # the 256 rows of one read
    tracemalloc.start()
    try:
        n_cells = sum(b.x.shape[0] for b in loader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n_cells == 8192
    assert peak < 4 * held < nbytes / 5, (peak, held, nbytes)  # a few copies of one read, never the matrix


def test_backed_training_equals_in_memory(pair, trained):
    """With one read covering every cell the minibatches are the same, so every loss is equal."""
    memory, backed = pair
    a = trained
    b = genailab.VAE(backed, **MODEL).fit(**FIT, chunk_rows=10**6)
    strip = [{k: v for k, v in record.items() if k != "seconds"} for record in a.history]
    assert strip == [{k: v for k, v in record.items() if k != "seconds"} for record in b.history]
    assert a.training_info == b.training_info  # same split and the same data hash
    assert float(a.module.default_library) == float(b.module.default_library)
    np.testing.assert_array_equal(a.get_latent(), b.get_latent())
    np.testing.assert_allclose(a.get_latent(backed), a.get_latent(memory), rtol=1e-6)


def test_small_chunks_shuffle_differently_but_score_the_same(pair, trained):
    """Small chunks change the training order (so the weights), not the data: the validation ELBO
    of fixed weights through the backed loader equals the in-memory one."""
    memory, backed = pair
    model = genailab.VAE(backed, **MODEL).fit(**FIT, chunk_rows=64, chunks_in_memory=2)
    assert model.history[0]["train_loss"] != trained.history[0]["train_loss"]
    val = model.validation_indices
    conditions = model.schema.encode_obs(memory.obs)
    chunked = MinibatchLoader(model.schema.expression(backed), conditions, indices=val, batch_size=100, shuffle=False)
    in_memory = MinibatchLoader(model.schema.expression(memory), conditions, indices=val, batch_size=100, shuffle=False)
    scores = []
    for loader in (chunked, in_memory):
        torch.manual_seed(1)  # the ELBO is estimated with one sample of z per cell
        scores.append(elbo_terms(model.module, loader))
    assert scores[0] == scores[1]
    np.testing.assert_allclose(model.get_latent(), model.get_latent(memory), rtol=1e-6)
    np.testing.assert_allclose(
        model.get_normalized_expression(conditions={"batch": "batch_0"}),
        model.get_normalized_expression(memory, conditions={"batch": "batch_0"}),
        rtol=1e-5,
    )


def test_backed_genes_in_another_order_and_dense_storage(pair, trained, tmp_path):
    memory, _ = pair
    model = trained
    expected = model.get_latent()
    shuffled = memory[:, np.random.default_rng(0).permutation(memory.n_vars)].copy()
    shuffled.write_h5ad(tmp_path / "shuffled.h5ad")
    np.testing.assert_allclose(model.get_latent(ad.read_h5ad(tmp_path / "shuffled.h5ad", backed="r")), expected, rtol=1e-6)
    dense = memory.copy()
    dense.X = dense.X.toarray()
    dense.write_h5ad(tmp_path / "dense.h5ad")
    np.testing.assert_allclose(model.get_latent(ad.read_h5ad(tmp_path / "dense.h5ad", backed="r")), expected, rtol=1e-6)


def test_backed_data_is_validated_block_by_block(pair, trained, tmp_path):
    memory, _ = pair
    counts = memory.X.toarray()
    counts[500, 3] = 0.5  # one fractional value
    counts[7] = 0  # one empty cell
    broken = ad.AnnData(X=sp.csr_matrix(counts), obs=memory.obs, var=memory.var)
    broken.write_h5ad(tmp_path / "broken.h5ad")
    with pytest.raises(InputDataError, match="non-integer"):
        genailab.VAE(ad.read_h5ad(tmp_path / "broken.h5ad", backed="r"), **MODEL).fit(**FIT)
    counts[500, 3] = 1.0
    broken.X = sp.csr_matrix(counts)
    broken.write_h5ad(tmp_path / "empty.h5ad")
    with pytest.raises(InputDataError, match="zero total counts"):
        genailab.VAE(ad.read_h5ad(tmp_path / "empty.h5ad", backed="r"), **MODEL).fit(**FIT)
    model = genailab.VAE(ad.read_h5ad(tmp_path / "empty.h5ad", backed="r"), **MODEL, empty_cells="drop")
    model.fit(**{**FIT, "epochs": 1})
    assert 7 not in model._split["train"] and 7 not in model.validation_indices
    csc = memory.copy()
    csc.X = sp.csc_matrix(csc.X)
    csc.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(InputDataError, match="CSC"):
        trained.get_latent(ad.read_h5ad(tmp_path / "csc.h5ad", backed="r"))


def test_unshuffled_reads_of_a_subset_give_the_in_memory_batches(pair):
    """Rows in a given (unsorted) order, some chunks' rows left out: the same batches as in memory."""
    memory, backed = pair
    rows = np.random.default_rng(0).permutation(memory.n_obs)[:250]
    on_disk = MinibatchLoader(OnDiskMatrix(backed.X), indices=rows, batch_size=48, shuffle=False, chunk_rows=32,
                              chunks_in_memory=2)
    in_memory = MinibatchLoader(memory.X, indices=rows, batch_size=48, shuffle=False)
    for a, b in zip(on_disk, in_memory, strict=True):
        np.testing.assert_array_equal(a.index.numpy(), b.index.numpy())
        np.testing.assert_array_equal(a.x.numpy(), b.x.numpy())
        for mine, theirs in zip(a.x_sparse, b.x_sparse, strict=True):
            np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    np.testing.assert_array_equal(on_disk.order(), rows)


def test_unshuffled_sorted_rows_read_at_most_the_chunks_held(pair):
    """Sparse rows in file order (a 5% validation split): each read holds at most ``chunks_in_memory``
    chunks of the file, however few of their rows are wanted, and the batches equal the in-memory ones."""
    memory, backed = pair
    rows = np.sort(np.random.default_rng(1).choice(memory.n_obs, 15, replace=False))
    matrix = OnDiskMatrix(backed.X)
    reads = _recorded_reads(matrix)
    on_disk = MinibatchLoader(matrix, indices=rows, batch_size=1024, shuffle=False, chunk_rows=16, chunks_in_memory=2)
    in_memory = MinibatchLoader(memory.X, indices=rows, batch_size=1024, shuffle=False)
    held = [np.unique(part // 16).size for part in on_disk._reads()]
    assert max(held) <= 2 and sum(part.size for part in on_disk._reads()) == rows.size
    for a, b in zip(on_disk, in_memory, strict=True):
        np.testing.assert_array_equal(a.x.numpy(), b.x.numpy())
    assert sum(stop - start for start, stop in reads) <= 16 * np.unique(rows // 16).size
