"""The AnnData-facing VAE on the embedded real counts: fit, latent, denoising, sampling, save/load."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import genailab
from genailab.data import pbmc68k_counts
from genailab.errors import ConfigError, SchemaMismatchError

FAST = dict(epochs=3, batch_size=64, progress=False, seed=0)


@pytest.fixture(scope="module")
def pbmc():
    adata = pbmc68k_counts()[:, :120].copy()
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 2, "b1", "b0"))
    return adata


@pytest.fixture(scope="module")
def trained(pbmc):
    model = genailab.VAE(pbmc, likelihood="nb", layer="counts", condition_keys=["batch"], latent_dim=4, hidden_dims=(32,))
    return model.fit(**FAST)


def test_fit_records_history_split_and_provenance(trained, pbmc):
    assert len(trained.history) == 3
    info = trained.training_info
    assert info["n_train"] + info["n_validation"] == pbmc.n_obs and info["n_validation"] == 70
    assert len(info["data_sha256"]) == 64
    counts = np.asarray(pbmc.layers["counts"].sum(1)).ravel()
    assert float(trained.module.default_library) == pytest.approx(np.median(counts[trained._split["train"]]))


def test_latent_means_and_samples(trained, pbmc):
    z = trained.get_latent()
    assert z.shape == (pbmc.n_obs, 4) and np.isfinite(z).all()
    draws = trained.get_latent(n_samples=3)
    assert draws.shape == (3, pbmc.n_obs, 4)
    assert np.abs(draws.mean(0) - z).mean() < np.abs(draws - z).mean()  # draws scatter around the mean


def test_normalized_expression_scales_to_library(trained, pbmc):
    fixed = trained.get_normalized_expression(library_size=1e4)
    np.testing.assert_allclose(fixed.sum(1), 1e4, rtol=1e-4)
    observed = trained.get_normalized_expression(library_size="observed")
    np.testing.assert_allclose(observed.sum(1), np.asarray(pbmc.layers["counts"].sum(1)).ravel(), rtol=1e-4)
    one_batch = trained.get_normalized_expression(conditions={"batch": "b0"})
    rows = (pbmc.obs["batch"] == "b0").to_numpy()
    np.testing.assert_allclose(one_batch[rows], fixed[rows], rtol=1e-5)
    assert not np.allclose(one_batch[~rows], fixed[~rows])
    with pytest.raises(ConfigError, match="library_size"):
        trained.get_normalized_expression(library_size=-1)


def test_sample_generates_counts_with_conditions(trained):
    generated = trained.sample(50, conditions={"batch": "b1"}, library_size=500, seed=0)
    assert generated.shape == (50, 120) and sp.issparse(generated.X)
    assert np.array_equal(generated.X.data, np.round(generated.X.data))
    assert (generated.obs["batch"] == "b1").all()
    totals = np.asarray(generated.X.sum(1)).ravel()
    assert 250 < totals.mean() < 1000  # NB draws around the requested library of 500
    with pytest.raises(SchemaMismatchError, match="Missing condition values"):
        trained.sample(5)
    with pytest.raises(SchemaMismatchError, match="not seen"):
        trained.sample(5, conditions={"batch": "b9"})


def test_save_load_round_trip_gives_identical_outputs(trained, pbmc, tmp_path):
    trained.save(tmp_path / "m")
    loaded = genailab.VAE.load(tmp_path / "m", pbmc)
    np.testing.assert_array_equal(loaded.get_latent(), trained.get_latent())
    np.testing.assert_array_equal(loaded.get_normalized_expression(), trained.get_normalized_expression())
    assert loaded.history == trained.history and loaded.schema == trained.schema
    np.testing.assert_array_equal(loaded._split["validation"], trained._split["validation"])
    with pytest.raises(Exception, match="already holds a saved model"):
        trained.save(tmp_path / "m")


def test_reordered_genes_are_aligned_by_name(trained, pbmc):
    shuffled = pbmc[:, np.random.default_rng(0).permutation(pbmc.n_vars)].copy()
    np.testing.assert_allclose(trained.get_latent(shuffled), trained.get_latent(), rtol=1e-5, atol=1e-6)


def test_gaussian_model_with_continuous_and_embedded_conditions(pbmc):
    lognorm = pbmc.copy()
    sc.pp.normalize_total(lognorm)
    sc.pp.log1p(lognorm)
    model = genailab.VAE(lognorm, likelihood="gaussian", condition_keys=["batch", "phase"],
                         continuous_keys=["percent_mito"], condition_encoding="embedding", latent_dim=3,
                         hidden_dims=(16,), embedding_dim=4)
    assert model.config.categorical_sizes == (2, 3) and model.config.condition_dim == 9
    model.fit(**FAST)
    assert model.history[-1]["train_elbo_loss"] < model.history[0]["train_elbo_loss"]
    sample = model.sample(4, conditions={"batch": "b0", "phase": "S", "percent_mito": 0.02})
    assert sample.shape == (4, 120) and not sp.issparse(sample.X)


def test_same_seed_same_latent(pbmc):
    def latent():
        model = genailab.VAE(pbmc, likelihood="zinb", layer="counts", latent_dim=3, hidden_dims=(16,))
        return model.fit(**FAST).get_latent()

    np.testing.assert_array_equal(latent(), latent())


def test_constructor_options_rebuild_the_same_architecture(pbmc):
    """Every architecture field of the config comes back (a new ModelConfig field cannot drop out)."""
    from genailab import VAE

    model = VAE(pbmc, likelihood="zinb", layer="counts", latent_dim=6, hidden_dims=(32, 16), dropout=0.2,
                dispersion="gene-cell", beta=0.5, norm="layer", activation="gelu")  # fmt: skip
    rebuilt = VAE(pbmc, **model.constructor_options())
    assert rebuilt.config == model.config
    assert rebuilt.schema.to_dict() == model.schema.to_dict()


def test_counts_in_adata_raw_are_read_with_layer_raw(pbmc):
    """Public h5ad files often keep counts in .raw and log-normalised highly variable genes in X."""
    import anndata
    import scanpy as sc

    from genailab import VAE
    from genailab.errors import SchemaMismatchError

    counts = anndata.AnnData(pbmc.layers["counts"].copy(), obs=pbmc.obs.copy(), var=pbmc.var[[]].copy())
    adata = counts.copy()
    adata.raw = counts  # all genes, raw counts
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata = adata[:, :200].copy()  # X: log-normalised subset; raw: every gene's counts
    model = VAE(adata, layer="raw", likelihood="nb", latent_dim=4, hidden_dims=(32,))
    assert model.schema.gene_names == tuple(counts.var_names)  # the genes of .raw, not of X
    model.fit(epochs=2, progress=False)
    np.testing.assert_allclose(model.get_expression(adata).toarray(), np.asarray(counts.X.todense()))
    assert model.get_latent(adata).shape == (adata.n_obs, 4)
    with pytest.raises(SchemaMismatchError, match="no .raw"):
        VAE(counts, layer="raw")
