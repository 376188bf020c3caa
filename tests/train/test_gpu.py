"""CUDA: training takes no host synchronisation per step (skipped without a CUDA device)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import genailab.train.trainer as trainer_module
from genailab.data.loader import MinibatchLoader
from genailab.model.vae import CVAE_ZINB
from genailab.train import TrainConfig, Trainer, seed_everything

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _counts(n, g=50, seed=0):
    rng = np.random.default_rng(seed)
    return sp.csr_matrix(rng.poisson(rng.gamma(2.0, 1.0, size=(1, g)), size=(n, g)).astype(np.float32))


def _syncs_of_one_epoch(n_cells: int) -> int:
    """Synchronising CUDA calls counted by torch's sync debug mode during one training epoch."""
    seed_everything(0)
    model = CVAE_ZINB(input_dim=50, latent_dim=4, hidden_dims=[32])
    config = TrainConfig(epochs=1, batch_size=16, progress=False, device="cuda", early_stopping_patience=None,
                         lr_plateau_patience=None, validation_fraction=0.0)
    trainer = Trainer(model, config)
    loader = MinibatchLoader(_counts(n_cells), batch_size=16, seed=0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(loader)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_training_steps_take_no_host_synchronisation(monkeypatch):
    """An epoch of 4 steps and one of 40 synchronise equally often: only around the epoch (the copy
    of the matrix and of the epoch's order to the GPU, the reads of the sums and flags at its end)."""
    monkeypatch.setattr(trainer_module, "DIVERGENCE_CHECK_STEPS", 10**6)
    short, long = _syncs_of_one_epoch(64), _syncs_of_one_epoch(640)
    assert short == long and long <= 10, (short, long)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_nan_batch_is_named_on_both_devices(device):
    """A NaN count in the 6th batch stops training there, read back from the device."""
    matrix = _counts(320).toarray()
    matrix[16 * 5 + 3, 7] = np.nan
    seed_everything(0)
    config = TrainConfig(epochs=1, batch_size=16, progress=False, device=device, validation_fraction=0.0)
    trainer = Trainer(CVAE_ZINB(input_dim=50, latent_dim=4, hidden_dims=[32]), config)
    with pytest.raises(trainer_module.TrainingDivergedError, match="epoch 1, batch 6 of 20"):
        trainer.fit(MinibatchLoader(matrix, batch_size=16, shuffle=False))


MODEL = dict(likelihood="zinb", layer="counts", condition_keys=["batch"], latent_dim=6, hidden_dims=(64,))
FIT = dict(epochs=20, batch_size=64, seed=0, progress=False, early_stopping_patience=None)


@pytest.fixture(scope="module")
def fitted(sim_adata_zinb):
    """The same model trained on the CPU and on CUDA (different random streams, same recipe)."""
    import genailab

    cpu = genailab.VAE(sim_adata_zinb, **MODEL).fit(**FIT, device="cpu")
    cuda = genailab.VAE(sim_adata_zinb, **MODEL).fit(**FIT, device="cuda")
    return cpu, cuda


def test_cuda_training_reaches_the_cpu_quality(fitted):
    cpu, cuda = fitted
    assert cuda.device.type == "cuda"
    assert cuda.history[-1]["val_elbo_loss"] == pytest.approx(cpu.history[-1]["val_elbo_loss"], rel=0.02)
    assert cuda.history[-1]["val_elbo_loss"] < 0.9 * cuda.history[0]["val_elbo_loss"]


def test_a_cuda_model_saved_and_loaded_infers_as_on_the_cpu(fitted, sim_adata_zinb, tmp_path):
    import genailab

    _, cuda = fitted
    cuda.save(tmp_path / "model")
    on_gpu = genailab.VAE.load(tmp_path / "model", sim_adata_zinb, device="cuda")
    on_cpu = genailab.VAE.load(tmp_path / "model", sim_adata_zinb, device="cpu")
    np.testing.assert_allclose(on_gpu.get_latent(), on_cpu.get_latent(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(on_gpu.get_latent(), cuda.get_latent(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(on_gpu.get_normalized_expression(), on_cpu.get_normalized_expression(), rtol=1e-3, atol=1e-3)
    torch.manual_seed(0)
    gpu_ll = on_gpu.get_marginal_ll(n_samples=20, indices=cuda.validation_indices)
    assert np.isfinite(gpu_ll).all()
    torch.manual_seed(0)
    cpu_ll = on_cpu.get_marginal_ll(n_samples=20, indices=cuda.validation_indices)
    assert gpu_ll.mean() == pytest.approx(cpu_ll.mean(), rel=0.01)  # different random draws, same estimate


def test_bfloat16_autocast_trains_as_well_as_float32(sim_adata_zinb, fitted):
    import genailab

    _, cuda = fitted
    bf16 = genailab.VAE(sim_adata_zinb, **MODEL).fit(**FIT, device="cuda", precision="bfloat16")
    assert bf16.history[-1]["val_elbo_loss"] == pytest.approx(cuda.history[-1]["val_elbo_loss"], rel=0.02)


def test_an_in_memory_matrix_is_preloaded_to_the_gpu():
    loader = MinibatchLoader(_counts(256), batch_size=64, seed=0)
    assert loader.preload(torch.device("cuda"))
    batches = list(loader)
    assert all(b.x.device.type == "cuda" and b.x_sparse is None for b in batches)
    host = MinibatchLoader(_counts(256), batch_size=64, seed=0)
    for a, b in zip(batches, host, strict=True):
        np.testing.assert_array_equal(a.x.cpu().numpy(), b.x.numpy())
