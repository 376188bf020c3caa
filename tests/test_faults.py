"""A training run killed without warning (SIGKILL) resumes from its last checkpoint and ends exactly
where an uninterrupted run with the same seed ends; one interrupted by Ctrl-C or SIGTERM keeps its
last finished epoch (checkpointed even with default options) and says how to resume."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import genailab
from genailab.cli import main
from genailab.data import simulate
from genailab.train import load_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

EPOCHS = 30
ARGS = ["--layer", "counts", "--condition", "batch", "--latent-dim", "3", "--hidden", "16", "--epochs", str(EPOCHS),
        "--batch-size", "32", "--kl-warmup", "5", "--patience", "0", "--checkpoint-every", "1", "--seed", "3",
        "--device", "cpu"]


def _wait_for(path, process, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint appeared: {process.communicate()}")
        time.sleep(0.005)


def _without_seconds(history):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def test_sigkill_mid_training_then_resume_matches_uninterrupted_run(tmp_path):
    adata = simulate(150, 30, n_cell_types=3, n_batches=2, seed=0)
    data = tmp_path / "data.h5ad"
    adata.write_h5ad(data)

    full = tmp_path / "full"
    result = CliRunner().invoke(main, ["train", str(data), "--out", str(full), *ARGS])
    assert result.exit_code == 0, result.output

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "genailab", "train", str(data), "--out", str(killed), *ARGS],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(killed / "checkpoint.pt", process)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "model.pt").exists(), "the run finished before it could be killed"
    reached = load_checkpoint(killed / "checkpoint.pt")["epoch"]  # the last complete checkpoint is readable
    assert 1 <= reached < EPOCHS

    result = CliRunner().invoke(
        main, ["train", str(data), "--out", str(killed), *ARGS, "--resume", str(killed / "checkpoint.pt")]
    )
    assert result.exit_code == 0, result.output

    a, b = genailab.VAE.load(full, adata), genailab.VAE.load(killed, adata)
    assert _without_seconds(b.history) == _without_seconds(a.history)
    assert [r["epoch"] for r in b.history] == list(range(1, EPOCHS + 1))
    for name, tensor in a.module.state_dict().items():
        torch.testing.assert_close(b.module.state_dict()[name], tensor, rtol=0, atol=1e-6)
    np.testing.assert_allclose(b.get_latent(), a.get_latent(), rtol=0, atol=1e-6)
    assert b.training_info == a.training_info


def _start(data, out, *extra):
    """`genailab -v train` in a child process with default checkpointing (none periodic)."""
    args = [sys.executable, "-m", "genailab", "-v", "train", str(data), "--out", str(out), *INTERRUPT_ARGS, *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_epoch(process, epoch, lines):
    for line in process.stderr:
        lines.append(line)
        if line.startswith(f"INFO genailab.train.trainer: epoch {epoch}:"):
            return
    raise AssertionError(f"training ended before epoch {epoch}: {''.join(lines)}")


INTERRUPT_ARGS = [a for a in ARGS if a not in ("--checkpoint-every", "1")]  # the defaults: no periodic checkpoint


@pytest.fixture
def sigint_raises():
    """Ctrl-C raises KeyboardInterrupt here and in the child processes started meanwhile, even when
    the test run itself was started with SIGINT ignored (as a background job of a non-interactive
    shell is): a child inherits an ignored signal, and Python then installs no handler for it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_an_interrupted_train_keeps_the_last_epoch_and_its_resume_command_finishes_the_same_run(tmp_path, signum, sigint_raises):
    adata = simulate(150, 30, n_cell_types=3, n_batches=2, seed=0)
    data = tmp_path / "data.h5ad"
    adata.write_h5ad(data)
    full = tmp_path / "full"
    assert CliRunner().invoke(main, ["train", str(data), "--out", str(full), *INTERRUPT_ARGS]).exit_code == 0

    out = tmp_path / "interrupted"
    process, lines = _start(data, out), []
    _wait_for_epoch(process, 3, lines)
    process.send_signal(signum)
    _, rest = process.communicate(timeout=120)
    stderr = "".join(lines) + rest
    assert process.returncode == 130, stderr
    assert not (out / "genailab.json").exists(), "the run finished before it could be interrupted"
    reached = load_checkpoint(out / "checkpoint.pt")["epoch"]
    assert 2 <= reached < EPOCHS  # epoch 3 may not have counted as finished when the signal came
    assert f"Interrupted: epoch {reached} of {EPOCHS} is saved in {out / 'checkpoint.pt'}. Resume with:" in stderr
    assert not (out / ".genailab.lock").exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    command = shlex.split(stderr.split("Resume with:\n", 1)[1].splitlines()[0])
    assert command[:2] == ["genailab", "train"] and command[-2:] == ["--resume", str(out / "checkpoint.pt")]
    result = CliRunner().invoke(main, command[1:])
    assert result.exit_code == 0, result.output
    a, b = genailab.VAE.load(full, adata), genailab.VAE.load(out, adata)
    assert _without_seconds(b.history) == _without_seconds(a.history)
    for name, tensor in a.module.state_dict().items():
        torch.testing.assert_close(b.module.state_dict()[name], tensor, rtol=0, atol=1e-6)


class _SignalAt(logging.Handler):
    """Sends this process ``signum`` when the trainer logs the end of epoch ``epoch`` (before that
    epoch counts as finished), as a user pressing Ctrl-C or a scheduler's SIGTERM would."""

    def __init__(self, epoch: int, signum: int):
        super().__init__(logging.INFO)
        self.prefix, self.signum = f"epoch {epoch}:", signum

    def emit(self, record):
        if record.getMessage().startswith(self.prefix):
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_an_interrupted_fit_leaves_the_model_at_its_last_finished_epoch(tmp_path, signum, sigint_raises):
    adata = simulate(150, 30, n_cell_types=3, n_batches=2, seed=0)
    options = dict(layer="counts", condition_keys=["batch"], latent_dim=3, hidden_dims=(16,))
    train = dict(batch_size=32, progress=False, seed=3, early_stopping_patience=None, kl_warmup_epochs=1.8)
    # the same warm-up as the 6-epoch run; an interrupted fit keeps its last epoch as trained (no
    # batch-norm recalibration, which follows a finished run)
    two_epochs = genailab.VAE(adata, **options).fit(epochs=2, recalibrate_norm=False, **train)

    model = genailab.VAE(adata, **options)
    logger, handler = logging.getLogger("genailab.train.trainer"), _SignalAt(3, signum)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.raises(KeyboardInterrupt):
            model.fit(epochs=6, checkpoint_dir=tmp_path, **train)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is removed again
    assert _without_seconds(model.history) == _without_seconds(two_epochs.history)
    for name, tensor in two_epochs.module.state_dict().items():
        torch.testing.assert_close(model.module.state_dict()[name], tensor, rtol=0, atol=0)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2

    resumed = genailab.VAE(adata, **options).fit(epochs=6, checkpoint_dir=tmp_path,
                                                 resume_from=tmp_path / "checkpoint.pt", **train)  # fmt: skip
    uninterrupted = genailab.VAE(adata, **options).fit(epochs=6, **train)
    assert _without_seconds(resumed.history) == _without_seconds(uninterrupted.history)
