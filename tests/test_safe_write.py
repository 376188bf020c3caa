"""Finished work is never thrown away: outputs are checked before the work, written whole or not at
all, the model folder is one unit, and a folder has one writer at a time."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.figure
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import genailab
from genailab.cli import main
from genailab.data import simulate
from genailab.errors import CheckpointError
from genailab.report.run_folder import write_run
from genailab.safe_write import LOCK_FILE, FolderLock, atomic_file, probe_writable, remove_orphans, write_text

TINY = dict(latent_dim=3, hidden_dims=(16,))
FAST = dict(epochs=2, batch_size=32, progress=False, seed=0)
CLI_TINY = ["--layer", "counts", "--latent-dim", "3", "--hidden", "16", "--epochs", "2", "--batch-size", "32"]
NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def counts():
    return simulate(120, 30, n_cell_types=3, n_batches=2, seed=0)


@pytest.fixture(scope="module")
def h5ad(counts, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "counts.h5ad"
    counts.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def run(h5ad, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "run"
    result = CliRunner().invoke(main, ["train", str(h5ad), "--out", str(folder), *CLI_TINY])
    assert result.exit_code == 0, result.output
    return folder


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.module.state_dict().items()}


def _assert_same_weights(model, weights) -> None:
    for name, tensor in weights.items():
        torch.testing.assert_close(model.module.state_dict()[name], tensor, rtol=0, atol=0)


# -- full disk ---------------------------------------------------------------------------------
def _half_then_full(original):
    """``original`` that writes a few bytes to its file, then fails as a full disk does."""

    def write(self, target, *args, **kwargs):
        target.write(b"\x89PNG half" if "b" in getattr(target, "mode", "b") else "half,a,row\n")
        raise NO_SPACE

    return write


@pytest.mark.parametrize("target", ["png", "csv"])
def test_full_disk_at_a_figure_or_table_keeps_the_model_and_leaves_no_empty_file(counts, tmp_path, monkeypatch, target):
    model = genailab.VAE(counts, layer="counts", **TINY).fit(**FAST)
    out = tmp_path / "run"
    patched = (matplotlib.figure.Figure, "savefig") if target == "png" else (pd.DataFrame, "to_csv")
    monkeypatch.setattr(*patched, _half_then_full(getattr(*patched)))
    with pytest.raises(CheckpointError, match="No space left on device.*free disk space") as info:
        write_run(model, out)
    name = "training_curves.png" if target == "png" else "history.csv"
    assert name in str(info.value)
    monkeypatch.undo()
    assert not (out / name).exists()  # neither an empty nor a half file under the final name
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    _assert_same_weights(genailab.VAE.load(out), _weights(model))  # the model, written first, is whole


def test_full_disk_leaves_the_earlier_file_unchanged(tmp_path, monkeypatch):
    table = tmp_path / "scores.csv"
    write_text(table, "old,table\n")
    monkeypatch.setattr(pd.DataFrame, "to_csv", _half_then_full(pd.DataFrame.to_csv))
    with pytest.raises(CheckpointError, match="Any earlier scores.csv there is unchanged"):
        with atomic_file(table, "w") as handle:
            pd.DataFrame({"a": [1]}).to_csv(handle)
    assert table.read_text() == "old,table\n" and _files(tmp_path) == ["scores.csv"]


# -- outputs checked before the work -----------------------------------------------------------
def _no_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the work started although the output cannot be written")

    for name in ("get_latent", "fit"):
        monkeypatch.setattr(genailab.VAE, name, refuse)
    monkeypatch.setattr(genailab.VAE, "load", refuse)


@pytest.mark.parametrize("command", ["embed", "denoise", "cluster", "de", "generate"])
@pytest.mark.parametrize("problem", ["parent is a file", "folder at the name", "read-only folder"])
def test_commands_check_their_output_before_loading_or_computing(run, h5ad, tmp_path, monkeypatch, command, problem):
    if problem == "read-only folder" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    _no_work(monkeypatch)
    name = "table.csv" if command == "de" else "out.h5ad"
    if problem == "parent is a file":
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / name
    elif problem == "folder at the name":
        out = tmp_path / name
        out.mkdir()
    else:
        (tmp_path / "ro").mkdir()
        out = tmp_path / "ro" / name
        os.chmod(tmp_path / "ro", 0o555)
    args = {
        "embed": ["embed", str(run), str(h5ad)],
        "denoise": ["denoise", str(run), str(h5ad)],
        "cluster": ["cluster", str(run), str(h5ad)],
        "de": ["de", str(run), str(h5ad), "--groupby", "cell_type", "--group", "type_0"],
        "generate": ["generate", str(run), "--n", "5"],
    }[command]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    if problem == "folder at the name":  # click's own check of dir_okay=False, or ours
        assert "is a directory" in result.output or "a folder of that name exists" in result.output
    else:
        assert "CheckpointError" in result.output and str(out.parent) in result.output


def test_train_checks_a_folder_path_that_is_a_file(h5ad, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    (tmp_path / "run").write_text("a file")
    result = CliRunner().invoke(main, ["train", str(h5ad), "--out", str(tmp_path / "run"), *CLI_TINY])
    assert result.exit_code != 0 and "it is a file, not a folder" in result.output


def test_the_write_probe_has_no_fixed_name(tmp_path, monkeypatch):
    names = []
    real_open = os.open

    def watching_open(path, flags, *args, **kwargs):
        names.append(Path(path).name)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", watching_open)
    probe_writable(tmp_path)
    probe_writable(tmp_path)
    monkeypatch.undo()
    assert len(set(names)) == 2 and all(n.startswith(".genailab-probe.") and n.endswith(".tmp") for n in names)
    assert _files(tmp_path) == []


# -- the model folder is one unit --------------------------------------------------------------
def _crash_at_replace(monkeypatch, matches):
    """os.replace fails (as a killed process would stop) when ``matches(src, dst)``."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if matches(Path(src), Path(dst)):
            raise KeyboardInterrupt("killed here")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("crash", ["before the description", "before the weights take their name"])
def test_a_save_killed_midway_leaves_a_loadable_model(counts, tmp_path, monkeypatch, crash):
    first = genailab.VAE(counts, layer="counts", **TINY).fit(**FAST)
    second = genailab.VAE(counts, layer="counts", **TINY).fit(**{**FAST, "seed": 1})
    folder = tmp_path / "model"
    first.save(folder)
    if crash == "before the description":
        _crash_at_replace(monkeypatch, lambda src, dst: dst.name == "genailab.json")
    else:
        _crash_at_replace(monkeypatch, lambda src, dst: src.name == "model.pending.pt")
    with pytest.raises(KeyboardInterrupt):
        second.save(folder, overwrite=True)
    monkeypatch.undo()
    loaded = genailab.VAE.load(folder)
    _assert_same_weights(loaded, _weights(first if crash == "before the description" else second))
    assert not (folder / LOCK_FILE).exists()  # the lock went with the interrupted save
    second.save(folder, overwrite=True)  # the next save completes the folder
    assert _files(folder) == ["genailab.json", "model.pt"]
    _assert_same_weights(genailab.VAE.load(folder), _weights(second))


def test_a_first_save_killed_before_its_weights_take_their_name_loads(counts, tmp_path, monkeypatch):
    """With no earlier model.pt, the folder held genailab.json and model.pending.pt: refused as 'not a
    saved genailab model', and a new save refused as 'already holds a saved model'."""
    model = genailab.VAE(counts, layer="counts", **TINY).fit(**FAST)
    _crash_at_replace(monkeypatch, lambda src, dst: src.name == "model.pending.pt")
    with pytest.raises(KeyboardInterrupt):
        model.save(tmp_path / "model")
    monkeypatch.undo()
    assert _files(tmp_path / "model") == ["genailab.json", "model.pending.pt"]
    _assert_same_weights(genailab.VAE.load(tmp_path / "model"), _weights(model))


def test_train_refuses_a_folder_with_a_model_unless_overwrite(run, h5ad):
    before = (run / "model.pt").read_bytes()
    result = CliRunner().invoke(main, ["train", str(h5ad), "--out", str(run), *CLI_TINY, "--seed", "4"])
    assert result.exit_code != 0 and "already holds a saved model; pass --overwrite" in result.output
    assert (run / "model.pt").read_bytes() == before


def test_a_new_run_never_keeps_another_runs_checkpoint(h5ad, tmp_path):
    out = tmp_path / "run"
    args = ["train", str(h5ad), "--out", str(out), *CLI_TINY]
    assert CliRunner().invoke(main, [*args, "--checkpoint-every", "1"]).exit_code == 0
    old_checkpoint = (out / "checkpoint.pt").read_bytes()
    result = CliRunner().invoke(main, [*args, "--seed", "5"])
    assert result.exit_code != 0 and "already holds a saved model" in result.output
    (out / "genailab.json").unlink()  # a run that crashed before saving: only its checkpoint is there
    result = CliRunner().invoke(main, [*args, "--seed", "5"])
    assert result.exit_code != 0 and "holds the checkpoint of an unfinished run (epoch" in result.output
    assert (out / "checkpoint.pt").read_bytes() == old_checkpoint
    result = CliRunner().invoke(main, [*args, "--seed", "5", "--overwrite", "--layer", "countz"])
    assert result.exit_code != 0 and "Layer 'countz' is not in adata.layers" in result.output
    assert (out / "checkpoint.pt").read_bytes() == old_checkpoint  # a typo did not cost the unfinished run
    result = CliRunner().invoke(main, [*args, "--seed", "5", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "checkpoint.pt").exists()  # the new run wrote no checkpoint; the stale one is gone
    assert genailab.VAE.load(out).train_config.seed == 5


def test_perturb_train_and_integrate_refuse_another_runs_checkpoint(h5ad, tmp_path):
    """Both left a VAE run's checkpoint beside their own model, where `train --resume` would take it for theirs."""
    out = tmp_path / "run"
    args = ["train", str(h5ad), "--out", str(out), *CLI_TINY, "--checkpoint-every", "1"]
    assert CliRunner().invoke(main, args).exit_code == 0
    (out / "genailab.json").unlink()
    (out / "model.pt").unlink()
    for command in (["integrate", str(h5ad), "--batch-key", "batch", "--layer", "counts"],
                    ["perturb", "train", str(h5ad), "--layer", "counts"]):
        result = CliRunner().invoke(main, [*command, "--out", str(out), "--epochs", "1"])
        assert result.exit_code != 0 and "holds the checkpoint of an unfinished run" in result.output, result.output
        assert (out / "checkpoint.pt").exists()


# -- one writer per folder ---------------------------------------------------------------------
_HOLDER = """
import sys, time
from genailab.safe_write import FolderLock
with FolderLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_process_is_refused_and_a_dead_owners_lock_is_taken_over(h5ad, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = CliRunner().invoke(main, ["train", str(h5ad), "--out", str(out), *CLI_TINY])
        assert result.exit_code != 0
        assert f"in use by another genailab process (PID {holder.pid}" in result.output
        assert "genailab.json" not in _files(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_FILE).read_text().startswith(f"{holder.pid}\n")  # left behind by the killed owner
    result = CliRunner().invoke(main, ["train", str(h5ad), "--out", str(out), *CLI_TINY])
    assert result.exit_code == 0, result.output
    assert not (out / LOCK_FILE).exists()  # released on exit


def test_the_lock_is_reentrant_in_one_process_and_released_by_the_outermost_holder(tmp_path):
    with FolderLock(tmp_path):
        with FolderLock(tmp_path):
            assert (tmp_path / LOCK_FILE).is_file()
        assert (tmp_path / LOCK_FILE).is_file()
    assert not (tmp_path / LOCK_FILE).exists()


# -- orphaned temporary files ------------------------------------------------------------------
_KILLED_WRITER = """
import os, signal, sys
from genailab.safe_write import atomic_file
with atomic_file(sys.argv[1]) as handle:
    handle.write(b"half a checkpoint")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_orphans_of_a_killed_checkpoint_write_are_removed_on_the_next_run(h5ad, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(out / "checkpoint.pt")])
    assert killed.returncode == -signal.SIGKILL
    orphans = [p.name for p in out.iterdir()]
    assert len(orphans) == 1 and orphans[0].startswith(".checkpoint.pt.") and orphans[0].endswith(".tmp")
    live = out / f".history.csv.{os.getpid()}.abcdefgh.tmp"  # a write in progress in a live process
    live.write_text("being written")
    result = CliRunner().invoke(main, ["train", str(h5ad), "--out", str(out), *CLI_TINY, "--checkpoint-every", "1"])
    assert result.exit_code == 0, result.output
    assert not (out / orphans[0]).exists() and live.exists()
    assert remove_orphans(out) == []


def test_a_failed_h5ad_write_is_a_clear_error_and_leaves_no_file(run, h5ad, tmp_path, monkeypatch):
    import anndata

    def half_then_full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"\x89HDF\r\n half")
        raise NO_SPACE

    monkeypatch.setattr(anndata.AnnData, "write_h5ad", half_then_full)
    out = tmp_path / "embedded.h5ad"
    result = CliRunner().invoke(main, ["embed", str(run), str(h5ad), "--out", str(out)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"Could not write {out} (No space left on device); free disk space" in result.output
    assert _files(tmp_path) == []


def test_fit_with_a_checkpoint_folder_in_use_by_another_process_is_refused(counts, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=f"in use by another genailab process \\(PID {holder.pid}"):
            genailab.VAE(counts, layer="counts", **TINY).fit(**FAST, checkpoint_every=1, checkpoint_dir=tmp_path)
        assert not (tmp_path / "checkpoint.pt").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_resuming_the_folders_own_checkpoint_continues_without_overwrite(h5ad, tmp_path):
    out = tmp_path / "run"
    args = ["train", str(h5ad), "--out", str(out), *CLI_TINY[:-4], "--batch-size", "32", "--checkpoint-every", "1"]
    assert CliRunner().invoke(main, [*args, "--epochs", "2"]).exit_code == 0
    result = CliRunner().invoke(main, [*args, "--epochs", "4", "--resume", str(out / "checkpoint.pt")])
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in genailab.VAE.load(out).history] == [1, 2, 3, 4]
