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
    full_config = TrainConfig(epochs=6, seed=3, progress=False, checkpoint_every=3, kl_warmup_epochs=1.8)
    uninterrupted, full = _fit(full_config, matrix, checkpoint_path=tmp_path / "full.pt")
    # An interrupted run: the same config, stopped after the checkpoint at epoch 3 (the warm-up set,
    # since by default a 3-epoch run warms up over a shorter share of the run than a 6-epoch one).
    _fit(TrainConfig(epochs=3, seed=3, progress=False, checkpoint_every=3, kl_warmup_epochs=1.8), matrix,
         checkpoint_path=tmp_path / "a.pt")
    trainer, resumed = _fit(full_config, matrix, checkpoint_path=tmp_path / "b.pt", resume=tmp_path / "a.pt")
    assert [r["epoch"] for r in resumed] == list(range(1, 7))
    for a, b in zip(full, resumed):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["val_elbo_loss"] == pytest.approx(b["val_elbo_loss"], rel=1e-6)
    final = uninterrupted.model.state_dict()  # batch-norm statistics recomputed at the end of both runs
    for name, tensor in trainer.model.state_dict().items():
        torch.testing.assert_close(tensor, final[name], rtol=1e-6, atol=1e-7)
    saved = load_checkpoint(tmp_path / "full.pt")["model"]  # the checkpoint keeps the training state
    for name, tensor in trainer.model.named_parameters():
        torch.testing.assert_close(tensor.detach(), saved[name], rtol=1e-6, atol=1e-7)


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


def test_a_short_given_run_ends_at_kl_weight_one():
    """fit(epochs=3) warms the KL weight up over 30% of the run, not 10 epochs, so it ends on the ELBO."""
    _, history = _fit(TrainConfig(epochs=3, seed=0, progress=False), _data())
    assert [r["kl_weight"] for r in history] == [pytest.approx(0.75 / 0.9), 1.0, 1.0]  # epoch 1's last step is at 0.75


def test_a_kl_warmup_set_longer_than_the_run_is_kept_with_one_warning(caplog):
    with caplog.at_level("WARNING", logger="genailab.train.trainer"):
        trainer, history = _fit(TrainConfig(epochs=3, kl_warmup_epochs=10, seed=0, progress=False), _data())
    assert trainer.config.kl_warmup_epochs == 10.0 and history[-1]["kl_weight"] < 0.3
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "kl_warmup_epochs=10" in warnings[0] and "reaches only 0.30" in warnings[0] and "at most 3" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="genailab.train.trainer"):
        _fit(TrainConfig(epochs=3, kl_warmup_epochs=3, seed=0, progress=False), _data())
    assert not caplog.records


@pytest.mark.parametrize(("epochs", "warmup"), [(2, 0.6), (30, 5.0)])
def test_the_adversary_warmup_fits_a_short_run(epochs, warmup):
    """The weights used: over 5 epochs, or over kl_warmup_fraction (30%) of a shorter run, then the full weight."""
    from genailab.model.adversary import BATCH_CORRECTION, BatchDiscriminator

    matrix = _data()
    labels = np.arange(120) % 2
    seed_everything(0)
    model = CVAE_NB(input_dim=matrix.shape[1], latent_dim=3, hidden_dims=[16])
    adversary = BatchDiscriminator(3, 2, BATCH_CORRECTION)
    used = []
    encoder_loss = adversary.encoder_loss
    adversary.encoder_loss = lambda z, batch, weight: used.append(weight) or encoder_loss(z, batch, weight)
    config = TrainConfig(epochs=epochs, seed=0, progress=False, early_stopping_patience=None)
    train = MinibatchLoader(matrix, labels=labels, indices=np.arange(100), batch_size=32, seed=0)
    Trainer(model, config, adversary=adversary).fit(train)
    steps = len(train)
    expected = [BATCH_CORRECTION.weight * min(1.0, s / steps / warmup) for s in range(epochs * steps)]
    assert used == pytest.approx(expected) and max(used) == BATCH_CORRECTION.weight


def _stopped_run(tmp_path, name, *, resume=None, **options):
    """A run that stops early after epoch 2 (min_delta so large that only the first epoch improves)."""
    options = dict(epochs=50, seed=1, progress=False, early_stopping_patience=1, early_stopping_min_delta=1e9,
                   checkpoint_every=1) | options  # fmt: skip
    config = TrainConfig(**options)
    return _fit(config, _data(), checkpoint_path=tmp_path / name, resume=resume)


def test_resuming_an_early_stopped_run_gives_that_run_bitwise(tmp_path):
    full, history = _stopped_run(tmp_path, "full.pt")
    assert len(history) == 2 and full.stopped_early
    resumed, again = _stopped_run(tmp_path, "again.pt", resume=tmp_path / "full.pt")
    assert resumed.stopped_early and again == history
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert load_checkpoint(tmp_path / "full.pt")["early_stopping"]["stopped"] is True


def test_an_early_stopped_checkpoint_trains_on_with_a_longer_patience_or_an_old_checkpoint(tmp_path):
    _stopped_run(tmp_path, "full.pt")
    state = load_checkpoint(tmp_path / "full.pt")
    _, longer = _stopped_run(tmp_path, "longer.pt", resume=tmp_path / "full.pt", early_stopping_patience=3)
    assert len(longer) == 4  # one more bad epoch than before... up to the new patience of 3
    del state["early_stopping"]["stopped"]  # a checkpoint written before `stopped` was kept: as before
    torch.save(state, tmp_path / "old.pt")
    trainer, old = _stopped_run(tmp_path, "old_again.pt", resume=tmp_path / "old.pt")
    assert len(old) == 3 and trainer.stopped_early


def test_fit_resumed_from_an_early_stopped_run_is_that_run(tmp_path):
    """VAE.fit(resume_from=) the checkpoint of a run that stopped early: no extra epoch, the same weights bitwise."""
    import genailab
    from genailab.data import simulate

    adata = simulate(120, 30, n_cell_types=3, n_batches=2, seed=0)
    run = dict(epochs=50, batch_size=32, seed=0, progress=False, early_stopping_patience=1, checkpoint_every=1)
    tiny = dict(layer="counts", condition_keys=["batch"], latent_dim=3, hidden_dims=(16,))
    full = genailab.VAE(adata, **tiny).fit(checkpoint_dir=tmp_path / "full", **run)
    assert full.training_info["stopped_early"] and len(full.history) < 50
    resumed = genailab.VAE(adata, **tiny).fit(checkpoint_dir=tmp_path / "again", resume_from=tmp_path / "full" /
                                              "checkpoint.pt", **run)  # fmt: skip
    assert len(resumed.history) == len(full.history) and resumed.training_info["stopped_early"]
    for name, tensor in full.module.state_dict().items():
        assert torch.equal(tensor, resumed.module.state_dict()[name]), name


@pytest.mark.parametrize("epochs", [1, 2, 20])
def test_one_cycle_steps_start_at_lr_and_end_at_min_lr(epochs):
    """The rates of the optimiser's steps: lr at the first (even under 10 steps), min_lr at the last."""
    config = TrainConfig(epochs=epochs, lr_schedule="one_cycle", lr=2e-3, min_lr=1e-6, seed=0, progress=False)
    seed_everything(0)
    trainer = Trainer(CVAE_NB(input_dim=30, latent_dim=3, hidden_dims=[16]), config)
    rates, step = [], trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: rates.append(trainer.optimizer.param_groups[0]["lr"]) or step(*a, **k)
    trainer.fit(MinibatchLoader(_data(), indices=np.arange(100), batch_size=32, seed=0))
    assert len(rates) == 4 * epochs and rates[0] == 2e-3 and rates[-1] == 1e-6 and max(rates) == 8e-3


def test_the_plateau_schedule_lowers_lr_after_more_than_patience_epochs_without_improvement():
    """As documented: lr *= lr_factor once more than lr_plateau_patience epochs in a row fail to improve the
    loss by 1e-4 relative to its best, and the count starts again after each drop."""
    config = TrainConfig(epochs=10, lr=1e-3, lr_plateau_patience=2, lr_factor=0.5, progress=False)
    trainer = Trainer(CVAE_NB(input_dim=30, latent_dim=3, hidden_dims=[16]), config)
    rates = []
    for loss in [10.0, 10.0, 9.9995, 10.0, 10.0, 10.0, 10.0]:  # 9.9995 is not a 1e-4 relative improvement on 10
        trainer.scheduler.step(loss)
        rates.append(trainer.optimizer.param_groups[0]["lr"])
    assert rates == [1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 2.5e-4]


def test_batch_norm_statistics_are_recomputed_from_the_training_cells_after_fit():
    """With momentum 0.01 the running statistics trailed the weights of a short default fit: a
    Gaussian model of 400 log-normalised cells decoded worse than each gene's mean (MSE 5.4 against
    1.2). After the fit they are the statistics of the training cells under the final weights."""
    import scanpy as sc

    import genailab
    from genailab.data import simulate

    adata = simulate(400, 100, n_cell_types=3, n_batches=2, seed=0)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    errors = {}
    for recalibrate in (False, True):
        model = genailab.VAE(adata, likelihood="gaussian", condition_keys=["batch"], latent_dim=4, hidden_dims=(32,))
        model.fit(seed=0, progress=False, recalibrate_norm=recalibrate)
        errors[recalibrate] = model.get_reconstruction_error()["mse"]
        first = model.module.encoder.layers[1]
        assert isinstance(first, torch.nn.BatchNorm1d) and first.momentum == 0.01  # the training momentum is back
    values = np.asarray(adata.X.toarray())
    each_genes_mean = float(np.mean(np.var(values, axis=0)))  # the MSE of predicting each gene's mean
    assert errors[True] < each_genes_mean < errors[False]
    # the encoder's first batch norm now holds the mean of its inputs over the training cells (dropout off)
    module = model.module.train()
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    x = torch.as_tensor(values[model.train_indices])
    c = torch.as_tensor(model.schema.encode_obs(adata.obs.iloc[model.train_indices]))
    inputs = []
    handle = first.register_forward_pre_hook(lambda m, i: inputs.append(i[0].detach()))
    with torch.no_grad():
        module._encode(x, c)
    handle.remove()
    module.eval()
    torch.testing.assert_close(first.running_mean, inputs[0].mean(0), rtol=0.01, atol=0.02)  # batches weigh equally
