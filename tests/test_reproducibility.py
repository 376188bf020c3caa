"""One seed fixes everything; the saved model records what made it; old model files keep loading."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import genailab
from genailab.data import simulate
from genailab.anndata_models.files import data_fingerprint

FIXTURE = Path(__file__).parent / "fixtures" / "model_v1"

FAST = dict(epochs=2, batch_size=32, progress=False)


@pytest.fixture(scope="module")
def counts():
    return simulate(120, 30, n_cell_types=3, n_batches=2, seed=0)


def _fit(adata, **options):
    model = genailab.VAE(adata, layer="counts", condition_keys=["batch"], latent_dim=3, hidden_dims=(16,))
    return model.fit(**FAST, **options)


def test_same_seed_gives_the_same_model_to_the_last_bit(counts):
    a, b = _fit(counts, seed=7), _fit(counts, seed=7)
    np.testing.assert_array_equal(a.get_latent(), b.get_latent())
    np.testing.assert_array_equal(a._split["validation"], b._split["validation"])
    for name, tensor in a.module.state_dict().items():
        assert torch.equal(tensor, b.module.state_dict()[name]), name
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in a.history] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in b.history
    ]
    other = _fit(counts, seed=8)
    assert not np.array_equal(other._split["validation"], a._split["validation"])
    assert not np.allclose(other.get_latent(), a.get_latent())


@pytest.fixture
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_deterministic_switch(counts, restore_determinism):
    torch.use_deterministic_algorithms(False)
    a = _fit(counts, seed=3, deterministic=True)
    assert not torch.are_deterministic_algorithms_enabled()  # switched on for the fit only: the caller's setting stays
    b = _fit(counts, seed=3, deterministic=True)
    np.testing.assert_array_equal(a.get_latent(), b.get_latent())
    assert a.train_config.deterministic


def test_saved_model_records_versions_data_hash_genes_split_and_config(counts, tmp_path):
    model = _fit(counts, seed=5)
    model.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "genailab.json").read_text())
    assert saved["format"] == "genailab-model" and saved["format_version"] == 2  # 2: the description carries its own hash
    for package in ("genailab", "torch", "numpy", "scipy", "anndata", "scanpy"):
        assert saved["versions"][package] == version(package)
    assert saved["versions"]["python"].count(".") == 2
    matrix = counts.layers["counts"]
    conditions = model.schema.encode_obs(counts.obs)
    assert saved["training"]["data_sha256"] == data_fingerprint(matrix, conditions, tuple(counts.var_names))
    changed = matrix.copy()
    changed.data[0] += 1
    assert data_fingerprint(changed, conditions, tuple(counts.var_names)) != saved["training"]["data_sha256"]
    assert saved["schema"]["gene_names"] == list(counts.var_names)
    assert saved["schema"]["categories"] == [["batch_0", "batch_1"]] and saved["schema"]["layer"] == "counts"
    assert saved["training"]["n_train"] == 108 and saved["training"]["n_validation"] == 12
    assert saved["model_config"] == model.config.to_dict() and saved["model_config"]["latent_dim"] == 3
    assert saved["train_config"] == model.train_config.to_dict() and saved["train_config"]["seed"] == 5
    loaded = genailab.VAE.load(tmp_path / "m")
    for part in ("train", "validation"):
        np.testing.assert_array_equal(loaded._split[part], model._split[part])
    assert np.union1d(loaded._split["train"], loaded._split["validation"]).size == counts.n_obs


def test_committed_format_1_model_still_loads_and_gives_the_same_numbers():
    """tests/fixtures/model_v1 was written by tests/fixtures/make_model_v1.py; it must keep loading."""
    expected = json.loads((FIXTURE / "expected.json").read_text())
    assert json.loads((FIXTURE / "genailab.json").read_text())["format_version"] == 1
    adata = ad.AnnData(
        obs=pd.DataFrame({"batch": pd.Categorical(expected["batch"])}, index=[f"c{i}" for i in range(len(expected["batch"]))]),
        var=pd.DataFrame(index=expected["genes"]),
        layers={"counts": sp.csr_matrix(np.asarray(expected["counts"], dtype=np.float32))},
    )
    model = genailab.VAE.load(FIXTURE)
    np.testing.assert_allclose(model.get_latent(adata), expected["latent"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        model.get_normalized_expression(adata, library_size=1e4), expected["normalized_expression"], rtol=1e-4
    )
    assert sum(p.stat().st_size for p in FIXTURE.iterdir()) < 100_000
