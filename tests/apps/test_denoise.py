"""Denoising against the simulator's true means."""

from __future__ import annotations

import numpy as np
import pytest

from genailab.apps import denoise, denoising_error
from genailab.errors import InputDataError


def test_denoised_beats_raw_and_library_normalised_counts(app_data, app_model):
    adata = app_data.copy()
    denoise(adata, app_model)
    errors = denoising_error(adata, app_model)
    # On the counts scale the baseline is the raw counts, on log CP10k the library-normalised counts.
    assert errors.loc[("counts", "genailab"), "mae"] < 0.9 * errors.loc[("counts", "observed"), "mae"]
    assert errors.loc[("log_cp10k", "genailab"), "mae"] < 0.75 * errors.loc[("log_cp10k", "observed"), "mae"]
    assert errors.loc[("log_cp10k", "genailab"), "pearson"] > 0.95
    assert adata.uns["genailab_denoised"]["params"]["library_size"] == "observed"


def test_library_size_and_dropout_options(app_data, app_model):
    adata = app_data.copy()
    denoise(adata, app_model, key_added="nb_mean")
    denoise(adata, app_model, key_added="per_10k", library_size=1e4)
    denoise(adata, app_model, key_added="with_dropout", include_dropout=True)
    observed = np.asarray(adata.layers["counts"].sum(axis=1)).ravel()
    np.testing.assert_allclose(adata.layers["nb_mean"].sum(axis=1), observed, rtol=1e-3)  # NB mean sums to the library
    np.testing.assert_allclose(adata.layers["per_10k"].sum(axis=1), 1e4, rtol=1e-3)
    ratio = adata.layers["with_dropout"].sum() / adata.layers["nb_mean"].sum()
    assert abs(ratio - 0.9) < 0.06  # the simulated dropout is 0.1


def test_genes_must_match_the_model(app_data, app_model):
    with pytest.raises(InputDataError, match="model's genes"):
        denoise(app_data[:, ::-1].copy(), app_model)


def test_denoise_never_writes_over_the_models_own_counts(app_data, app_model):
    from genailab.errors import ConfigError, InputDataError

    adata = app_data.copy()
    for key in ("counts", None, ""):
        with pytest.raises(ConfigError, match="key_added"):
            denoise(adata, app_model, key_added=key)
    assert adata.layers["counts"] is app_data.layers["counts"] or (adata.layers["counts"] != app_data.layers["counts"]).nnz == 0
    with pytest.raises(InputDataError, match=r"denoised='genailab_denoised' is not in adata.layers"):
        denoising_error(adata, app_model)
