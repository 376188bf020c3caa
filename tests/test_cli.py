"""The command line end to end on temporary h5ad files."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from genailab.cli import main
from genailab.data import pbmc68k_counts


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    adata = pbmc68k_counts()[:300, :80].copy()
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 3, "b1", "b0"))
    path = tmp_path_factory.mktemp("data") / "pbmc.h5ad"
    adata.write_h5ad(path)
    return path


def test_every_command_has_help():
    runner = CliRunner()
    for command in [[], *([name] for name in main.commands)]:
        result = runner.invoke(main, [*command, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_train_then_embed(h5ad, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(main, ["train", str(h5ad), "--model", "zinb", "--layer", "counts", "--condition", "batch",
                                  "--latent-dim", "4", "--hidden", "32,16", "--epochs", "4", "--batch-size", "64",
                                  "--kl-warmup", "2", "--seed", "1", "--out", str(run)])
    assert result.exit_code == 0, result.output
    for name in ("genailab.json", "model.pt", "history.csv", "training_curves.png"):
        assert (run / name).is_file()
    history = pd.read_csv(run / "history.csv")
    assert len(history) == 4 and {"train_elbo_loss", "val_elbo_loss"} <= set(history.columns)
    config = json.loads((run / "genailab.json").read_text())
    assert config["model_config"]["likelihood"] == "zinb" and config["model_config"]["hidden_dims"] == [32, 16]

    out = tmp_path / "embedded.h5ad"
    result = runner.invoke(main, ["embed", str(run), str(h5ad), "--out", str(out)])
    assert result.exit_code == 0, result.output
    embedded = ad.read_h5ad(out)
    assert embedded.obsm["X_genailab"].shape == (300, 4)
    params = embedded.uns["X_genailab"]["params"]  # the model that made the latent, exactly
    from genailab.anndata_models.files import model_fingerprint

    assert params["model"] == str(run.resolve()) and params["model_sha256"] == model_fingerprint(run)
    assert params["latent_dim"] == 4 and params["align_genes"] is False


def test_bad_input_gives_one_clean_line(h5ad, tmp_path):
    result = CliRunner().invoke(main, ["train", str(h5ad), "--model", "nb", "--condition", "nope", "--out", str(tmp_path / "r")])
    assert result.exit_code != 0
    assert "SchemaMismatchError" in result.output and "nope" in result.output
    assert "Traceback" not in result.output


def test_console_script_and_module_entry_point():
    assert shutil.which("genailab") is not None, "run scripts/install.sh: the genailab command is missing"
    for command in (["genailab", "--help"], [sys.executable, "-m", "genailab", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0 and "train" in result.stdout


def test_resume_from_the_run_folders_own_checkpoint_continues_that_run(h5ad, tmp_path):
    """The checkpoint in --out belongs to the run saved there: resuming it replaces that run's model
    without --overwrite (a new run over it still needs --overwrite)."""
    run = tmp_path / "run"
    base = ["train", str(h5ad), "--layer", "counts", "--out", str(run), "--latent-dim", "4", "--hidden", "16",
            "--checkpoint-every", "1"]  # fmt: skip
    assert CliRunner().invoke(main, [*base, "--epochs", "2"]).exit_code == 0
    result = CliRunner().invoke(main, [*base, "--epochs", "4", "--resume", str(run / "checkpoint.pt")])
    assert result.exit_code == 0, result.output
    assert len(json.loads((run / "genailab.json").read_text())["history"]) == 4
    again = CliRunner().invoke(main, [*base, "--epochs", "2"])
    assert again.exit_code != 0 and "--overwrite" in again.output


def test_no_checkpoint_lags_the_finished_model(h5ad, tmp_path):
    """An epoch count that is no multiple of --checkpoint-every, and a resume without it, both end
    with the run's checkpoint (if any) at the model's last epoch."""
    from genailab.train import load_checkpoint

    run = tmp_path / "run"
    base = ["train", str(h5ad), "--layer", "counts", "--out", str(run), "--latent-dim", "4", "--hidden", "16"]
    assert CliRunner().invoke(main, [*base, "--epochs", "3", "--checkpoint-every", "2"]).exit_code == 0
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 3
    result = CliRunner().invoke(main, [*base, "--epochs", "5", "--resume", str(run / "checkpoint.pt")])
    assert result.exit_code == 0, result.output
    assert len(json.loads((run / "genailab.json").read_text())["history"]) == 5
    assert not (run / "checkpoint.pt").exists() and "it held an earlier epoch" in result.output


def test_errors_speak_the_command_lines_options(h5ad, tmp_path):
    """Each fix an error suggests is an option of the command that failed, never a Python argument."""
    train = ["train", str(h5ad), "--out", str(tmp_path / "r"), "--latent-dim", "4", "--hidden", "16"]
    cases = [
        ([*train, "--layer", "nope"], "or leave --layer unset to read adata.X"),
        ([*train, "--layer", "counts", "--epochs", "-1"], "Leave --epochs unset"),
        ([*train, "--layer", "counts", "--condition-key", "nope"], "choose other --condition-key"),
        (["simulate", "--n-cells", "50", "--n-genes", "20", "--out", str(tmp_path / "s.h5ad")], "raise --n-genes or lower --cell-types"),
        (["simulate", "--n-cells", "0", "--out", str(tmp_path / "s.h5ad")], "--n-cells must be a whole number >= 1"),
        (["simulate", "--n-cells", "50", "--n-genes", "60", "--drugs", "2", "--out", str(tmp_path / "s.h5ad")],
         "--drugs shape the drug arm; add --perturbation"),
    ]  # fmt: skip
    for args, expected in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0 and expected in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_demo_replaces_its_saved_model_only_with_overwrite(h5ad, tmp_path):
    """The demo replaced out/model (leaving the old run's report files) without --overwrite."""
    from genailab import VAE

    old = VAE(ad.read_h5ad(h5ad), likelihood="nb", latent_dim=2, hidden_dims=(8,))
    old.save(tmp_path / "model")
    before = (tmp_path / "model" / "model.pt").read_bytes()
    refused = CliRunner().invoke(main, ["demo", "--epochs", "1", "--out", str(tmp_path)])
    assert refused.exit_code == 1 and "already holds a saved model; pass --overwrite" in refused.output, refused.output
    assert (tmp_path / "model" / "model.pt").read_bytes() == before and not (tmp_path / "metrics.json").exists()
    replaced = CliRunner().invoke(main, ["demo", "--epochs", "1", "--out", str(tmp_path), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert VAE.load(tmp_path / "model").schema.n_genes == json.loads((tmp_path / "metrics.json").read_text())["n_genes"]


def test_running_out_of_memory_is_one_line_naming_the_size_options(h5ad, tmp_path):
    """A size beyond the machine's memory gave numpy's or torch's allocation traceback."""
    runner = CliRunner()
    assert runner.invoke(main, ["train", str(h5ad), "--epochs", "1", "--latent-dim", "2", "--hidden", "8",
                                "--out", str(tmp_path / "run")]).exit_code == 0  # fmt: skip
    limited = "ulimit -v 8000000; exec " + shlex.join([sys.executable, "-m", "genailab"])
    commands = {
        "generate": (["generate", str(tmp_path / "run"), "--n-cells", "100000000000", "--out", str(tmp_path / "g.h5ad")],
                     "an allocation of 1.46 TiB failed; lower --n-cells or run"),
        "train": (["train", str(h5ad), "--hidden", "100000000", "--epochs", "1", "--out", str(tmp_path / "big")],
                  "failed; lower --hidden, --batch-size, --latent-dim or run"),
    }  # fmt: skip
    for name, (args, expected) in commands.items():
        result = subprocess.run(["bash", "-c", f"{limited} {shlex.join(args)}"], capture_output=True, text=True)
        assert result.returncode == 1 and "Error: Out of memory: " in result.stderr, (name, result.stderr[-2000:])
        assert expected in result.stderr and "Traceback" not in result.stderr, (name, result.stderr[-2000:])
    assert not (tmp_path / "big").exists() and not (tmp_path / "g.h5ad").exists()


def test_overwrite_removes_the_old_runs_outputs_it_does_not_write_again(h5ad, tmp_path):
    """train --overwrite over an integrate run left its integrated.h5ad beside the new model."""
    from genailab.cli.common import COMMAND_OUTPUTS
    from genailab.report.run_folder import RUN_FILES

    assert COMMAND_OUTPUTS[: len(RUN_FILES)] == RUN_FILES
    run, runner = tmp_path / "run", CliRunner()
    (tmp_path / "run").mkdir()
    (run / "notes.txt").write_text("the user's own file")
    integrated = runner.invoke(main, ["integrate", str(h5ad), "--batch-key", "batch", "--layer", "counts",
                                      "--latent-dim", "2", "--hidden", "8", "--epochs", "1", "--out", str(run)])  # fmt: skip
    assert integrated.exit_code == 0 and (run / "integrated.h5ad").is_file(), integrated.output
    refused = runner.invoke(main, ["train", str(h5ad), "--epochs", "1", "--out", str(run)])
    assert refused.exit_code == 1 and (run / "integrated.h5ad").is_file()  # without --overwrite nothing changes
    trained = runner.invoke(main, ["train", str(h5ad), "--layer", "counts", "--latent-dim", "3", "--hidden", "8",
                                   "--epochs", "2", "--out", str(run), "--overwrite"])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    assert not (run / "integrated.h5ad").exists() and (run / "notes.txt").read_text() == "the user's own file"
    assert len(pd.read_csv(run / "history.csv")) == 2 and (run / "training_curves.png").is_file()
    assert json.loads((run / "genailab.json").read_text())["model_config"]["latent_dim"] == 3
