"""A sparse matrix with a damaged structure (bytes overwritten inside an h5ad, arrays edited in
place) is an InputDataError naming the problem, in memory and backed, at training and prediction
time: never an IndexError, a segmentation fault or a silently wrong latent."""

from __future__ import annotations

import shutil
import subprocess
import sys

import anndata
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from genailab import VAE
from genailab.data.simulate import simulate
from genailab.data.sparse_structure import check_sparse_structure
from genailab.data.validation import check_expression
from genailab.errors import InputDataError

N_CELLS, N_GENES = 120, 40

# name -> (how to damage the file's X group, what the message says)
DAMAGE = {
    "index far beyond the genes": (lambda x: x["indices"].__setitem__(slice(3, 9), 2**30),
                                   "stores column index 1073741824 in row 0, outside 0..39"),
    "index just beyond the genes": (lambda x: x["indices"].__setitem__(3, N_GENES), "column index 40 in row 0"),
    "negative index": (lambda x: x["indices"].__setitem__(3, -7), "column index -7 in row 0"),
    "indptr decreasing": (lambda x: x["indptr"].__setitem__(5, x["indptr"][7] + 1), "its indptr decreases at row 5"),
    "indptr not starting at 0": (lambda x: x["indptr"].__setitem__(0, 2), "its indptr starts at 2, not 0"),
    "indptr past the values": (lambda x: x["indptr"].__setitem__(-1, x["indptr"][-1] + 50),
                               "its indptr points outside the"),
}


@pytest.fixture(scope="module")
def counts():
    adata = simulate(N_CELLS, N_GENES, n_cell_types=2, n_batches=1, seed=0)
    adata.X = sp.csr_matrix(adata.layers["counts"])
    del adata.layers["counts"], adata.layers["true_mean"]
    return adata


@pytest.fixture(scope="module")
def good_file(counts, tmp_path_factory):
    path = tmp_path_factory.mktemp("corrupt") / "good.h5ad"
    counts.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def trained(counts):
    return VAE(counts, likelihood="nb", latent_dim=4, hidden_dims=(16,)).fit(epochs=2, seed=0, progress=False)


def damaged_copy(good_file, tmp_path, damage: str):
    path = tmp_path / "damaged.h5ad"
    shutil.copy(good_file, path)
    with h5py.File(path, "r+") as f:
        DAMAGE[damage][0](f["X"])
    return path


@pytest.mark.parametrize("backed", [False, True], ids=["in memory", "backed"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_training_on_a_damaged_file_is_an_input_error(good_file, tmp_path, damage, backed):
    adata = anndata.read_h5ad(damaged_copy(good_file, tmp_path, damage), backed="r" if backed else None)
    with pytest.raises(InputDataError, match="damaged sparse matrix") as info:
        VAE(adata, likelihood="nb", latent_dim=4, hidden_dims=(16,)).fit(epochs=1, progress=False)
    assert DAMAGE[damage][1] in str(info.value)
    assert ("backed h5ad's X" if backed else "adata.X") in str(info.value)


@pytest.mark.parametrize("backed", [False, True], ids=["in memory", "backed"])
@pytest.mark.parametrize("damage", ["index far beyond the genes", "index just beyond the genes", "indptr decreasing"])
def test_prediction_on_a_damaged_file_is_an_input_error(trained, good_file, tmp_path, damage, backed):
    adata = anndata.read_h5ad(damaged_copy(good_file, tmp_path, damage), backed="r" if backed else None)
    with pytest.raises(InputDataError, match="damaged sparse matrix"):
        trained.get_latent(adata)


def test_a_damaged_query_in_another_gene_order_fails_before_genes_are_picked(trained, counts):
    query = counts[:, ::-1].copy()  # the model reorders the columns: scipy would index with the bad value
    query.X.indices[4] = 10**6
    with pytest.raises(InputDataError, match="column index 1000000 in row 0"):
        trained.get_latent(query)


def test_a_valid_but_unsorted_structure_is_accepted_and_gives_the_same_latent(trained, counts):
    """Unsorted indices within a row are valid CSR: not flagged, and the latent equals the sorted one's."""
    query = counts.copy()
    reference = trained.get_latent(query)
    lo, hi = query.X.indptr[0], query.X.indptr[1]
    order = np.arange(lo, hi)[::-1]
    query.X.indices[lo:hi], query.X.data[lo:hi] = query.X.indices[order].copy(), query.X.data[order].copy()
    query.X.has_sorted_indices = False
    assert not query.X.has_sorted_indices and hi - lo > 1
    np.testing.assert_allclose(trained.get_latent(query), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(40))
def test_the_check_agrees_with_scipys_full_check(seed):
    """Random damage to indptr or indices: ours raises exactly when scipy's full check_format does."""
    rng = np.random.default_rng(seed)
    matrix = sp.random(30, 12, density=0.3, format=rng.choice(["csr", "csc"]), random_state=seed)
    target = matrix.indptr if rng.random() < 0.5 else matrix.indices
    position = rng.integers(target.size)
    target[position] = target[position] + rng.choice([-40, -3, -1, 1, 3, 40])
    try:
        matrix.check_format(full_check=True)
        scipy_ok = True
    except ValueError:
        scipy_ok = False
    if scipy_ok:
        check_sparse_structure(matrix)
    else:
        with pytest.raises(InputDataError, match="damaged sparse matrix"):
            check_sparse_structure(matrix)


def test_check_expression_finds_damage_in_the_same_pass_as_the_counts(counts):
    matrix = counts.X.copy()
    check_expression(matrix, counts=True)
    matrix.indices[-1] = N_GENES + 5
    with pytest.raises(InputDataError, match=f"column index {N_GENES + 5} in row {N_CELLS - 1}"):
        check_expression(matrix, counts=True, source="The expression matrix")


@pytest.mark.parametrize(
    ("value", "message"),
    [(np.nan, "1 NaN or infinite"), (np.inf, "1 NaN or infinite"), (-np.inf, "1 NaN or infinite"),
     (-2.0, "negative values"), (2.5, "1 non-integer values")],
)
def test_each_kind_of_bad_count_gets_its_own_message(counts, value, message):
    """Valid counts pass in one combined pass; a bad value is then named by its own check."""
    matrix = counts.X.copy()
    check_expression(matrix, counts=True)
    matrix.data[7] = value
    with pytest.raises(InputDataError, match=message):
        check_expression(matrix, counts=True)
    dense = matrix.toarray()
    with pytest.raises(InputDataError, match=message):
        check_expression(dense, counts=True)


SCRIPT = """
import sys
from click.testing import CliRunner
from genailab.cli import main
result = CliRunner().invoke(main, sys.argv[1:])
print(result.output)
sys.exit(result.exit_code)
"""


def test_cli_train_and_embed_on_indices_far_beyond_the_genes_do_not_crash(trained, good_file, tmp_path):
    """Before, both commands died of a segmentation fault; run in a child process so a crash cannot take
    pytest with it."""
    damaged = damaged_copy(good_file, tmp_path, "index far beyond the genes")
    run = tmp_path / "model"
    trained.save(run)
    for args in (["train", str(damaged), "--out", str(tmp_path / "run"), "--epochs", "1"],
                 ["embed", str(run), str(damaged), "--out", str(tmp_path / "e.h5ad")]):
        done = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
        assert "InputDataError: adata.X is a damaged sparse matrix" in done.stdout
        assert "Traceback" not in done.stdout + done.stderr
