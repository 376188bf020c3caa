"""PerturbationModel shares the VAE's lifecycle: resume continues the same run, a backed h5ad
trains like the same data in memory, and save/load goes through the one constructor."""

from __future__ import annotations

import dataclasses

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from genailab.data.simulate import PerturbationSpec, simulate
from genailab.errors import CheckpointError
from genailab.perturb import PerturbationModel
from genailab.train.trainer import load_checkpoint

OPTIONS = dict(latent_dim=4, hidden_dims=(32,))
TRAIN = dict(batch_size=64, seed=2, progress=False, early_stopping_patience=None)


@pytest.fixture(scope="module")
def adata():
    spec = PerturbationSpec(n_drugs=2, doses=(1.0, 10.0), control_fraction=0.3)
    return simulate(400, 40, n_cell_types=2, n_batches=1, perturbation=spec, seed=0)


def _histories_equal(a, b):
    drop = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert drop(a) == drop(b)


def test_resume_continues_the_same_run(adata, tmp_path):
    """A 3-epoch run resumed to 6 epochs is the 6-epoch run (warm-ups fixed, as a short run shortens them)."""
    adversary = dataclasses.replace(PerturbationModel.__init__.__kwdefaults__["adversary"], warmup_epochs=0.5)
    options = dict(**OPTIONS, adversary=adversary)
    train = dict(**TRAIN, kl_warmup_epochs=1.8)
    uninterrupted = PerturbationModel(adata, layer="counts", **options).fit(epochs=6, **train)
    PerturbationModel(adata, layer="counts", **options).fit(epochs=3, checkpoint_every=3, checkpoint_dir=tmp_path, **train)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 3
    resumed = PerturbationModel(adata, layer="counts", **options).fit(
        epochs=6, checkpoint_every=3, checkpoint_dir=tmp_path, resume_from=tmp_path / "checkpoint.pt", **train
    )
    _histories_equal(resumed.history, uninterrupted.history)
    for name, tensor in uninterrupted.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[name], tensor)
    assert resumed.adversary is not None  # the drug adversary was restored and trained on


def test_resume_refuses_a_checkpoint_of_another_architecture(adata, tmp_path):
    PerturbationModel(adata, layer="counts", **OPTIONS).fit(epochs=1, checkpoint_every=1, checkpoint_dir=tmp_path, **TRAIN)
    other = PerturbationModel(adata, layer="counts", latent_dim=5, hidden_dims=(32,))
    with pytest.raises(CheckpointError):
        other.fit(epochs=2, checkpoint_dir=tmp_path, resume_from=tmp_path / "checkpoint.pt", **TRAIN)


def test_backed_h5ad_trains_like_memory(adata, tmp_path):
    on_disk = adata.copy()
    on_disk.X = sp.csr_matrix(adata.layers["counts"])
    del on_disk.layers["counts"]
    on_disk.write_h5ad(tmp_path / "pert.h5ad")
    backed = anndata.read_h5ad(tmp_path / "pert.h5ad", backed="r")
    memory = anndata.read_h5ad(tmp_path / "pert.h5ad")
    a = PerturbationModel(memory, **OPTIONS).fit(epochs=2, **TRAIN)
    b = PerturbationModel(backed, **OPTIONS).fit(epochs=2, **TRAIN, chunk_rows=512, chunks_in_memory=1)
    assert b.training_info["data_sha256"] == a.training_info["data_sha256"]
    for ra, rb in zip(a.history, b.history):
        assert rb["val_elbo_loss"] == pytest.approx(ra["val_elbo_loss"], rel=1e-5)
    np.testing.assert_allclose(b.get_basal_latent(), a.get_basal_latent(memory), rtol=1e-4, atol=1e-5)


def test_save_load_keeps_the_adversary_and_the_split(adata, tmp_path):
    model = PerturbationModel(adata, layer="counts", **OPTIONS).fit(epochs=2, **TRAIN)
    model.save(tmp_path / "m")
    loaded = PerturbationModel.load(tmp_path / "m", adata, device="cpu")
    np.testing.assert_array_equal(loaded.validation_indices, model.validation_indices)
    for name, tensor in model.adversary.state_dict().items():
        torch.testing.assert_close(loaded.adversary.state_dict()[name], tensor)
    controls = adata[adata.obs["drug"] == "control"]
    np.testing.assert_allclose(
        loaded.predict(controls, drug="drug_0", dose=1.0).X, model.predict(controls, drug="drug_0", dose=1.0).X,
        rtol=1e-5,
    )


def test_an_option_typo_is_a_clear_error(adata):
    from genailab.errors import ConfigError

    with pytest.raises(ConfigError, match="latent_dims.*the options of ModelConfig are"):
        PerturbationModel(adata, layer="counts", latent_dims=4)
    with pytest.raises(ConfigError, match="epoch.*the options of TrainConfig are"):
        PerturbationModel(adata, layer="counts", **OPTIONS).fit(epoch=2)
