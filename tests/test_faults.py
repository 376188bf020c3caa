"""A training run killed without warning (SIGKILL) resumes from its last checkpoint and ends exactly
where an uninterrupted run with the same seed ends."""

from __future__ import annotations

import os
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
