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
    """An epoch of 4 steps and one of 40 synchronise equally often: only at the epoch's end."""
    monkeypatch.setattr(trainer_module, "DIVERGENCE_CHECK_STEPS", 10**6)
    short, long = _syncs_of_one_epoch(64), _syncs_of_one_epoch(640)
    assert short == long and long <= 6, (short, long)


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
