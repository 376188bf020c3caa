"""The fast inference paths (the encoder's first layer on the stored entries, decoded means written
into the result, reused buffers) against the dense encoder and the distributions' own means, batch
by batch, for every likelihood and option of denoised expression."""

from __future__ import annotations

import anndata
import numpy as np
import pytest
import scanpy as sc
import torch

import genailab
from genailab.anndata_models.base import seeded
from genailab.data import simulate

FIT = dict(epochs=2, batch_size=64, progress=False, seed=0)


@pytest.fixture(scope="module", params=["nb", "zinb", "gaussian"])
def fitted(request):
    # Shallow counts (about 60 per cell over 200 genes), about a quarter stored, as sparse as real
    # data: the encoder's first layer then runs on the stored entries.
    adata = simulate(600, 200, n_cell_types=3, n_batches=2, likelihood="zinb", library_mean=60.0, seed=0)
    layer = "counts"
    if request.param == "gaussian":
        adata.X = adata.layers["counts"].copy()
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        layer = None
    model = genailab.VAE(adata, likelihood=request.param, layer=layer, condition_keys=["batch"], latent_dim=4,
                         hidden_dims=(32,))  # fmt: skip
    return model.fit(**FIT), adata


def _reference(model, adata, *, library_size, conditions=None, n_samples=1, include_dropout=False, batch_size, seed=0):
    """E[x|z,c] as the mean of ``decode(...)``'s distribution (for ZINB without dropout, its NB
    base's), batch by batch with the same random draws as the method: the plain path the fast
    one must equal."""
    module = model.module.eval()
    x_all = model.get_expression(adata)
    x_all = torch.as_tensor(x_all.toarray() if hasattr(x_all, "toarray") else x_all)
    own = torch.as_tensor(model.encode_conditions(adata.obs))
    decoded = torch.as_tensor(model.encode_conditions(adata.obs, conditions))
    rows = []
    with torch.no_grad(), seeded(seed if n_samples > 1 else None):
        for start in range(0, adata.n_obs, batch_size):
            part = slice(start, start + batch_size)
            x = x_all[part]
            mean, var = module.encode(x, own[part])
            library = x.sum(1, keepdim=True) if library_size == "observed" else torch.full((len(x), 1), library_size)
            draws = [mean] if n_samples == 1 else [module.reparameterize(mean, var) for _ in range(n_samples)]
            means = []
            for z in draws:
                px = module.decode(z, decoded[part], library if model.config.is_count_model else None)
                nb_mean_only = model.config.likelihood == "zinb" and not include_dropout
                means.append(px.base.mean if nb_mean_only else px.mean)
            rows.append((sum(means) / len(means)).numpy())
    return np.concatenate(rows)


@pytest.mark.parametrize("batch_size", [1024, 77])
def test_denoised_equals_the_decoded_distribution_mean(fitted, batch_size):
    model, adata = fitted
    result = model.get_normalized_expression(adata, batch_size=batch_size)
    assert result.dtype == np.float32 and result.flags.c_contiguous and result.flags.writeable
    expected = _reference(model, adata, library_size=1e4, batch_size=batch_size)
    np.testing.assert_allclose(result, expected, rtol=2e-5, atol=1e-6 * np.abs(expected).max())
    if model.config.is_count_model:
        np.testing.assert_allclose(result.sum(1), 1e4, rtol=1e-4)


def test_denoised_result_is_an_ordinary_array_that_outlives_the_call(fitted, tmp_path):
    """The result's memory comes from torch (not numpy's huge-page allocation): it must still
    behave as a plain numpy array for the user, stored in a layer, written to h5ad and read back."""
    model, adata = fitted
    result = model.get_normalized_expression(adata)
    copy = result.copy()
    del model
    stored = adata.copy()
    stored.layers["denoised"] = result
    stored.write_h5ad(tmp_path / "denoised.h5ad")
    del stored, result
    back = anndata.read_h5ad(tmp_path / "denoised.h5ad").layers["denoised"]
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, copy)


def test_denoised_options_equal_the_reference(fitted):
    model, adata = fitted
    if not model.config.is_count_model:
        pytest.skip("library and dropout options are for count models")
    kwargs = dict(batch_size=100)
    for options in (
        dict(library_size="observed"),
        dict(library_size=1e4, conditions={"batch": "batch_0"}),
        dict(library_size=1e4, n_samples=3, seed=5),
    ):
        result = model.get_normalized_expression(adata, **options, **kwargs)
        expected = _reference(model, adata, **options, **kwargs)
        np.testing.assert_allclose(result, expected, rtol=2e-5, atol=1e-6 * expected.max())
    genes = [adata.var_names[7], adata.var_names[3], adata.var_names[150]]
    subset = model.get_normalized_expression(adata, gene_list=genes, n_samples=2, **kwargs)
    full = model.get_normalized_expression(adata, n_samples=2, **kwargs)
    np.testing.assert_array_equal(subset, full[:, [7, 3, 150]])
    if model.config.likelihood == "zinb":
        with_dropout = model.get_normalized_expression(adata, include_dropout=True, **kwargs)
        expected = _reference(model, adata, library_size=1e4, include_dropout=True, **kwargs)
        np.testing.assert_allclose(with_dropout, expected, rtol=2e-5, atol=1e-6 * expected.max())
        assert (with_dropout <= model.get_normalized_expression(adata, **kwargs)).all()


def test_denoised_under_bfloat16_autocast_stays_close(fitted):
    """A caller's ``torch.autocast`` (bf16 matrix products on the CPU) still fills the float32 result."""
    model, adata = fitted
    exact = model.get_normalized_expression(adata)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        approximate = model.get_normalized_expression(adata)
    assert approximate.dtype == np.float32
    error = np.abs(approximate - exact)
    assert error.mean() < 1e-2 * np.abs(exact).mean() and error.max() < 3e-2 * np.abs(exact).max()
    assert error.max() > 0  # the products did run in bf16


@pytest.mark.parametrize("batch_size", [1024, 77])
def test_latent_equals_the_dense_encoder(fitted, batch_size):
    """The first layer runs on the stored entries of the CSR data; the posterior means and draws
    equal the dense encoder's, computed plainly batch by batch, to float32 rounding."""
    model, adata = fitted
    x_all = model.get_expression(adata)
    x_all = torch.as_tensor(x_all.toarray() if hasattr(x_all, "toarray") else x_all)
    assert (x_all != 0).float().mean() < 0.5  # sparse enough for the stored-entries path
    conditions = torch.as_tensor(model.encode_conditions(adata.obs))
    module = model.module.eval()
    with torch.no_grad():
        parts = [module.encode(x_all[i : i + batch_size], conditions[i : i + batch_size]) for i in range(0, adata.n_obs, batch_size)]
    mean = torch.cat([m for m, _ in parts]).numpy()
    var = torch.cat([v for _, v in parts]).numpy()
    tolerance = dict(rtol=1e-5, atol=1e-5 * np.abs(mean).max())
    np.testing.assert_allclose(model.get_latent(adata, batch_size=batch_size), mean, **tolerance)
    draws = model.get_latent(adata, n_samples=2, seed=3, batch_size=batch_size)
    with seeded(3):
        eps = torch.randn((2, *mean.shape)).numpy()
    np.testing.assert_allclose(draws, mean + np.sqrt(var) * eps, **tolerance)
