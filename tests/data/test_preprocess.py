"""prepare_counts: raw counts kept exactly, empties filtered, genes selected, X log-normalised."""

from __future__ import annotations

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

from genailab.data.preprocess import prepare_counts
from genailab.errors import ConfigError, InputDataError, SchemaMismatchError


def _with_empties(sim_adata):
    """The simulated counts in X with cells 0-1 and genes 0-2 emptied."""
    counts = sim_adata.layers["counts"].toarray()
    counts[:2] = 0
    counts[:, :3] = 0
    adata = anndata.AnnData(sp.csr_matrix(counts), obs=sim_adata.obs.copy(), var=sim_adata.var.copy())
    return adata, counts


@pytest.mark.parametrize("kind", ["csr", "dense", "backed"])
def test_counts_kept_empties_filtered_and_x_log_normalised(sim_adata, tmp_path, kind):
    adata, counts = _with_empties(sim_adata)
    if kind == "dense":
        adata.X = counts
    if kind == "backed":
        adata.write_h5ad(tmp_path / "x.h5ad")
        adata = anndata.read_h5ad(tmp_path / "x.h5ad", backed="r")
    out = prepare_counts(adata, library_key="observed")
    assert out.shape == (598, 197)
    kept = counts[2:, 3:]
    stored = out.layers["counts"]
    np.testing.assert_array_equal(stored.toarray() if sp.issparse(stored) else stored, kept)
    np.testing.assert_allclose(out.obs["observed"], kept.sum(1), rtol=1e-6)
    x = out.X.toarray() if sp.issparse(out.X) else out.X
    np.testing.assert_allclose(np.expm1(x).sum(1), 1e4, rtol=1e-4)
    np.testing.assert_allclose(x, np.log1p(kept / kept.sum(1, keepdims=True) * 1e4), rtol=1e-4, atol=1e-5)
    assert out.obs["library_size"].equals(sim_adata.obs["library_size"].iloc[2:])  # truth untouched
    record = out.uns["genailab_preprocess"]
    assert record["n_cells_removed"] == 2 and record["n_genes_removed"] == 3
    assert record["params"]["target_sum"] == 1e4 and "n_top_genes" not in record["params"]


def test_input_is_not_modified(sim_adata):
    adata, counts = _with_empties(sim_adata)
    prepare_counts(adata, n_top_genes=50)
    assert adata.shape == (600, 200) and not adata.layers and "n_counts" not in adata.obs
    np.testing.assert_array_equal(adata.X.toarray(), counts)


@pytest.mark.parametrize("batch_key", [None, "batch"])
def test_highly_variable_genes_on_counts(sim_adata, batch_key):
    out = prepare_counts(sim_adata, layer="counts", n_top_genes=40, batch_key=batch_key, log_normalize=False)
    assert out.n_vars == 40 and out.var["highly_variable"].all()
    assert (out.X != out.layers["counts"]).nnz == 0
    np.testing.assert_allclose(out.obs["library_size"], np.asarray(out.layers["counts"].sum(1)).ravel())
    # Marker genes (30 of 200) carry the strongest cell-type signal, so they are over-represented.
    assert out.var["marker_of"].notna().mean() > 2 * sim_adata.var["marker_of"].notna().mean()
    assert out.uns["genailab_preprocess"]["params"]["hvg_flavor"] == "seurat_v3"


def test_more_genes_asked_than_left_keeps_all(sim_adata):
    out = prepare_counts(sim_adata, n_top_genes=10_000)
    assert out.n_vars == 200 and out.var["highly_variable"].all()


def test_bad_inputs_raise_clear_errors(sim_adata):
    with pytest.raises(InputDataError, match="non-integer"):
        prepare_counts(anndata.AnnData(np.full((3, 4), 0.5, dtype=np.float32)))
    with pytest.raises(SchemaMismatchError, match="layer 'raw'"):
        prepare_counts(sim_adata, layer="raw")
    with pytest.raises(SchemaMismatchError, match="batch_key"):
        prepare_counts(sim_adata, batch_key="sample")
    with pytest.raises(ConfigError, match="n_top_genes"):
        prepare_counts(sim_adata, n_top_genes=0)
    with pytest.raises(InputDataError, match="no cells or genes"):
        prepare_counts(anndata.AnnData(np.zeros((3, 4), dtype=np.float32)))


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(target_sum=0), ConfigError, "target_sum must be a positive number, got 0"),
        (dict(target_sum=-1), ConfigError, "target_sum must be a positive number, got -1"),
        (dict(target_sum=float("inf")), ConfigError, "target_sum must be a positive finite number, got inf"),
        (dict(min_cells=-1), ConfigError, "min_cells must be a non-negative whole number, got -1"),
        (dict(min_counts=-1), ConfigError, "min_counts must be a non-negative whole number, got -1"),
        (dict(counts_layer=None), ConfigError, "counts_layer must be a non-empty name such as 'counts', got None"),
        (dict(counts_layer=""), ConfigError, "counts_layer must be a non-empty name"),
        (dict(n_top_genes=2.5), ConfigError, "n_top_genes must be a whole number >= 1, got 2.5. None keeps every gene"),
    ],
)
def test_bad_options_name_the_argument(sim_adata, options, error, message):
    with pytest.raises(error, match=message) as caught:
        prepare_counts(sim_adata, **options)
    assert caught.value.argument == next(iter(options))


def test_duplicated_genes_and_missing_x_say_how_to_fix(sim_adata):
    repeated = sim_adata.copy()
    repeated.var_names = ["g0", "g0", *repeated.var_names[2:]]
    with pytest.raises(InputDataError, match=r"var_names repeat \['g0'\]; .*adata.var_names_make_unique\(\)"):
        prepare_counts(repeated)
    no_x = anndata.AnnData(obs=sim_adata.obs, var=sim_adata.var, layers={"counts": sim_adata.layers["counts"]})
    with pytest.raises(InputDataError, match=r"adata.X is None.*layer='counts'"):
        prepare_counts(no_x)
    assert prepare_counts(no_x, layer="counts").n_obs > 0
