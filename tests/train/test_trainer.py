"""The training loop: falling loss, early stopping, checkpoints and exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from genailab.data.loader import MinibatchLoader
from genailab.model.vae import CVAE_NB
from genailab.train import TrainConfig, Trainer, load_checkpoint, seed_everything
from genailab.errors import CheckpointError


def _data(n=120, g=30, seed=0):
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 3, n)
    rates = rng.gamma(2.0, 2.0, size=(3, g))[types]
    return sp.csr_matrix(rng.poisson(rates).astype(np.float32))


def _fit(config, matrix, *, checkpoint_path=None, resume=None):
    seed_everything(config.seed)
    model = CVAE_NB(input_dim=matrix.shape[1], latent_dim=3, hidden_dims=[16])
    trainer = Trainer(model, config, checkpoint_path=checkpoint_path)
    if resume is not None:
        trainer.load_state_dict(load_checkpoint(resume))
    train = MinibatchLoader(matrix, indices=np.arange(100), batch_size=32, seed=config.seed)
    val = MinibatchLoader(matrix, indices=np.arange(100, 120), batch_size=64, shuffle=False)
    return trainer, trainer.fit(train, val)


def test_history_records_terms_and_loss_falls():
    config = TrainConfig(epochs=30, lr=1e-2, seed=0, progress=False, kl_warmup_epochs=5)
    _, history = _fit(config, _data())
    assert len(history) == 30
    assert {"train_reconstruction", "train_kl", "train_elbo_loss", "val_elbo_loss", "kl_weight", "lr"} <= set(history[0])
    assert history[-1]["train_elbo_loss"] < 0.9 * history[0]["train_elbo_loss"]
    assert history[-1]["val_elbo_loss"] < history[0]["val_elbo_loss"] - 5  # per cell, on held-out cells
    assert history[0]["kl_weight"] < 1.0 and history[-1]["kl_weight"] == 1.0


def test_early_stopping_ends_training():
    config = TrainConfig(epochs=200, seed=0, progress=False, early_stopping_patience=2, early_stopping_min_delta=1e9)
    trainer, history = _fit(config, _data())
    assert len(history) == 3 and trainer.stopped_early


def test_resume_continues_the_same_loss_curve(tmp_path):
    matrix = _data()
    full_config = TrainConfig(epochs=6, seed=3, progress=False, checkpoint_every=3)
    _, full = _fit(full_config, matrix, checkpoint_path=tmp_path / "full.pt")
    # An interrupted run: the same config, stopped after the checkpoint at epoch 3.
    _fit(TrainConfig(epochs=3, seed=3, progress=False, checkpoint_every=3), matrix, checkpoint_path=tmp_path / "a.pt")
    trainer, resumed = _fit(full_config, matrix, checkpoint_path=tmp_path / "b.pt", resume=tmp_path / "a.pt")
    assert [r["epoch"] for r in resumed] == list(range(1, 7))
    for a, b in zip(full, resumed):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["val_elbo_loss"] == pytest.approx(b["val_elbo_loss"], rel=1e-6)
    final = load_checkpoint(tmp_path / "full.pt")["model"]
    for name, tensor in trainer.model.state_dict().items():
        torch.testing.assert_close(tensor, final[name], rtol=1e-6, atol=1e-7)


def test_checkpoint_refuses_other_files(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointError, match="not a genailab training checkpoint"):
        load_checkpoint(bad)
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint(bad)


def test_divergence_watch_keeps_the_first_non_finite_loss_on_the_device():
    from genailab.train.trainer import _DivergenceWatch

    watch = _DivergenceWatch(torch.device("cpu"))
    for step, value in enumerate([3.0, 2.5, float("inf"), 1.0, float("nan")]):
        watch.record(torch.tensor(value), step)
        if step == 1:
            assert watch.first_bad() is None
    assert watch.first_bad() == (2, float("inf"))  # the first bad step, not the later NaN


def test_auto_epochs_train_on_a_one_cycle_schedule():
    """epochs=None: round(50 / sqrt(100 training cells)) = 5 epochs, lr up to 4 x lr, then down to ~min_lr."""
    config = TrainConfig(auto_epoch_scale=50.0, lr=2e-3, one_cycle_peak=4.0, seed=0, progress=False)
    trainer, history = _fit(config, _data())
    lrs = [r["lr"] for r in history]
    assert len(history) == 5 and trainer.config.epochs == 5 and trainer.config.lr_schedule == "one_cycle"
    assert lrs == sorted(lrs, reverse=True) and 6e-3 < lrs[0] < 8e-3 and lrs[-1] < 1e-4
    assert history[0]["kl_weight"] < 1.0 and history[-1]["kl_weight"] == 1.0  # warm-up over 30% of the run
    assert history[-1]["val_elbo_loss"] < history[0]["val_elbo_loss"]
