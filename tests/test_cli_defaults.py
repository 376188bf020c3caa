"""The command line and the Python API build the same model for the same request: every
model-training command saves the configs the API builds with the same arguments."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from genailab import VAE, TrainConfig
from genailab.apps import integrate
from genailab.cli import COMMANDS, main
from genailab.data.simulate import PerturbationSpec, simulate
from genailab.model.adversary import BASAL_LATENT, BATCH_CORRECTION
from genailab.perturb import PerturbationModel


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    adata = simulate(
        240, 40, n_cell_types=2, n_batches=2, seed=0,
        perturbation=PerturbationSpec(n_drugs=2, doses=(1.0,), control_fraction=0.4),
    )  # fmt: skip
    path = tmp_path_factory.mktemp("data") / "sim.h5ad"
    adata.write_h5ad(path)
    return adata, path


def _saved(folder):
    return json.loads((folder / "genailab.json").read_text())


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_train_builds_the_apis_default_model(data, tmp_path):
    adata, path = data
    _run("train", path, "--out", tmp_path / "run", "--layer", "counts", "--condition-key", "batch", "--epochs", 1)
    saved = _saved(tmp_path / "run")
    api = VAE(adata, layer="counts", condition_keys=["batch"]).fit(TrainConfig(epochs=1))
    assert saved["model_config"] == api.config.to_dict()
    assert saved["train_config"] == api.train_config.to_dict()  # as trained (data-dependent defaults resolved)


def test_integrate_builds_the_apis_default_model(data, tmp_path):
    adata, path = data
    _run("integrate", path, "--batch-key", "batch", "--layer", "counts", "--epochs", 1, "--out", tmp_path / "int")
    saved = _saved(tmp_path / "int")
    model = integrate(adata.copy(), batch_key="batch", layer="counts", train=TrainConfig(epochs=1))
    assert saved["model_config"] == model.config.to_dict()
    assert saved["adversary_config"] == BATCH_CORRECTION.to_dict() == model.adversary_config.to_dict()
    assert saved["train_config"] == model.train_config.to_dict()


def test_perturb_train_builds_the_apis_default_model(data, tmp_path):
    adata, path = data
    _run("perturb", "train", path, "--layer", "counts", "--epochs", 1, "--out", tmp_path / "pert")
    saved = _saved(tmp_path / "pert")
    api = PerturbationModel(adata, layer="counts").fit(TrainConfig(epochs=1))
    assert saved["model_config"] == api.config.to_dict()
    assert saved["adversary_config"] == BASAL_LATENT.to_dict() == api.adversary_config.to_dict()
    assert saved["train_config"] == api.train_config.to_dict()


def test_old_option_spellings_still_work(data, tmp_path):
    adata, path = data
    _run("train", path, "--out", tmp_path / "old", "--layer", "counts", "--model", "zinb", "--condition", "batch",
         "--epochs", 1)  # fmt: skip
    saved = _saved(tmp_path / "old")
    assert saved["model_config"] == VAE(adata, layer="counts", likelihood="zinb", condition_keys=["batch"]).config.to_dict()
    refused = CliRunner().invoke(main, ["train", str(path), "--out", str(tmp_path / "both"), "--layer", "counts",
                                        "--model", "nb", "--likelihood", "zinb", "--epochs", "1"])  # fmt: skip
    assert refused.exit_code == 2 and "--model nb and --likelihood zinb disagree" in refused.output, refused.output
    assert not (tmp_path / "both" / "model.pt").exists()  # one of the two was taken silently before
    agreed = CliRunner().invoke(main, ["train", str(path), "--out", str(tmp_path / "both"), "--layer", "counts",
                                       "--model", "zinb", "--likelihood", "zinb", "--epochs", "1"])  # fmt: skip
    assert agreed.exit_code == 0 and _saved(tmp_path / "both")["model_config"]["likelihood"] == "zinb"


def test_command_summaries_match_the_commands():
    """``genailab --help`` lists COMMANDS without importing them; the summaries must not drift."""
    ctx = click.Context(main)
    for name, (_, summary) in COMMANDS.items():
        command = main.get_command(ctx, name)
        assert command.get_short_help_str(limit=500) == summary, name


def test_verbosity_works_after_the_subcommand(data, tmp_path):
    _, path = data
    result = CliRunner().invoke(main, ["simulate", "--n-cells", "50", "--n-genes", "80", "--out",
                                       str(tmp_path / "s.h5ad"), "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output


def _leaf_commands():
    ctx = click.Context(main)
    for name in COMMANDS:
        command = main.get_command(ctx, name)
        if isinstance(command, click.Group):
            yield from ((f"{name} {sub}", command.get_command(ctx, sub)) for sub in command.list_commands(ctx))
        else:
            yield name, command


def test_one_vocabulary_across_commands():
    """README, Command line: `--device` on every command that runs a model, `--labels-key` for labels."""
    no_model = {"simulate", "convert"}
    for name, command in _leaf_commands():
        visible = {opt for param in command.params if isinstance(param, click.Option) and not param.hidden
                   for opt in param.opts}  # fmt: skip
        if name not in no_model:
            assert "--device" in visible, name
        assert not visible & {"--label-key", "--labels", "--label"}, name


def test_simulate_writes_the_apis_default_data(tmp_path):
    import anndata as ad
    import numpy as np

    _run("simulate", "--out", tmp_path / "sim.h5ad")
    written, api = ad.read_h5ad(tmp_path / "sim.h5ad"), simulate()
    assert written.shape == api.shape
    np.testing.assert_array_equal(written.layers["counts"].toarray(), api.layers["counts"].toarray())
