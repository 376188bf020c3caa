"""The application commands end to end on a temporary simulated h5ad: denoise, generate, integrate, cluster, de."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from genailab.cli import main
from genailab.data.simulate import simulate


def _invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A simulated h5ad and a ZINB model trained on it by ``genailab train``."""
    folder = tmp_path_factory.mktemp("apps")
    data = folder / "sim.h5ad"
    simulate(300, 60, n_cell_types=3, n_batches=2, likelihood="zinb", n_markers=5, seed=0).write_h5ad(data)
    _invoke("train", data, "--model", "zinb", "--layer", "counts", "--condition", "batch", "--condition", "cell_type",
            "--latent-dim", "4", "--hidden", "32", "--epochs", "30", "--batch-size", "32",
            "--out", folder / "run")  # fmt: skip
    return folder / "run", data


def test_denoise(run, tmp_path):
    run_dir, data = run
    out = tmp_path / "denoised.h5ad"
    assert "layers['genailab_denoised']" in _invoke("denoise", run_dir, data, "--out", out, "--library-size", "10000")
    denoised = ad.read_h5ad(out)
    np.testing.assert_allclose(denoised.layers["genailab_denoised"].sum(axis=1), 1e4, rtol=1e-3)
    truth = denoised.layers["true_mean"] / denoised.layers["true_mean"].sum(axis=1, keepdims=True)
    counts = denoised.layers["counts"].toarray()
    raw_error = np.abs(np.log1p(1e4 * counts / counts.sum(1, keepdims=True)) - np.log1p(1e4 * truth)).mean()
    model_error = np.abs(np.log1p(denoised.layers["genailab_denoised"]) - np.log1p(1e4 * truth)).mean()
    assert model_error < 0.8 * raw_error


def test_generate_from_prior_and_posterior(run, tmp_path):
    run_dir, data = run
    _invoke("generate", run_dir, "--n", 40, "--condition", "batch=batch_0", "--condition", "cell_type=type_1",
            "--out", tmp_path / "prior.h5ad")  # fmt: skip
    prior = ad.read_h5ad(tmp_path / "prior.h5ad")
    assert (
        prior.shape == (40, 60) and set(prior.obs["cell_type"]) == {"type_1"} and set(prior.obs["batch"]) == {"batch_0"}
    )
    assert np.all(prior.X.data == np.round(prior.X.data))
    _invoke("generate", run_dir, "--n", 40, "--condition", "cell_type=type_2", "--source", "posterior", "--data", data,
            "--out", tmp_path / "posterior.h5ad")  # fmt: skip
    posterior = ad.read_h5ad(tmp_path / "posterior.h5ad")
    real = ad.read_h5ad(data)
    assert set(real.obs.loc[posterior.obs["source_cell"], "cell_type"]) == {"type_2"}


def test_integrate(run, tmp_path):
    _, data = run
    out = tmp_path / "integrated"
    output = _invoke("integrate", data, "--batch", "batch", "--layer", "counts", "--labels", "cell_type",
                     "--latent-dim", "4", "--hidden", "32", "--epochs", "3", "--out", out)  # fmt: skip
    assert "knn_batch_entropy" in output and "nmi" in output
    integrated = ad.read_h5ad(out / "integrated.h5ad")
    assert integrated.obsm["X_genailab_integrated"].shape == (300, 4)
    assert integrated.layers["genailab_corrected"].shape == (300, 60)
    assert (out / "genailab.json").is_file() and (out / "training_curves.png").is_file()


@pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")  # inside scanpy's plotting
def test_cluster(run, tmp_path):
    run_dir, data = run
    output = _invoke("cluster", run_dir, data, "--out", tmp_path / "clustered.h5ad", "--labels", "cell_type",
                     "--resolution", "0.5")  # fmt: skip
    assert "ARI" in output
    clustered = ad.read_h5ad(tmp_path / "clustered.h5ad")
    assert {"X_genailab", "X_umap"} <= set(clustered.obsm) and "rank_genes_groups" in clustered.uns
    assert clustered.obs["leiden"].nunique() >= 2
    assert (tmp_path / "clustered_umap.png").stat().st_size > 10_000


def test_de(run, tmp_path):
    run_dir, data = run
    out = tmp_path / "de.csv"
    output = _invoke("de", run_dir, data, "--groupby", "cell_type", "--group", "type_0", "--reference", "type_1",
                     "--delta", "1", "--level", "group", "--out", out)  # fmt: skip
    assert "genes differ" in output
    table = pd.read_csv(out, index_col=0)
    assert len(table) == 60 and {"lfc_mean", "proba_de", "is_de_fdr"} <= set(table.columns)
    assert table["proba_de"].is_monotonic_decreasing
    markers = set(ad.read_h5ad(data).var.query("marker_of in ['type_0', 'type_1']").index)
    assert len(markers & set(table.index[:10])) >= 6  # the top of the ranking holds the simulated markers


def test_bad_condition_is_one_clean_line(run, tmp_path):
    run_dir, _ = run
    result = CliRunner().invoke(
        main, ["generate", str(run_dir), "--n", "5", "--condition", "batch", "--out", str(tmp_path / "x.h5ad")]
    )
    assert result.exit_code != 0 and "KEY=VALUE" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(
        main, ["generate", str(run_dir), "--n", "5", "--source", "posterior", "--out", str(tmp_path / "x.h5ad")]
    )
    assert result.exit_code != 0 and "posterior" in result.output


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["denoise", "{run}", "{data}", "--key", "counts"], "--key counts is the layer the model reads"),
        (["cluster", "{run}", "{data}", "--labels-key", "kind"], "obs has no column 'kind' (given as --labels-key)"),
        (["generate", "{run}", "--n", "5", "--condition", "batch=batch_9"], "--condition batch=batch_9 is a category"),
        (["generate", "{run}", "--n", "5", "--library-size", "-1"], "or no --library-size (the default)"),
        (["integrate", "{data}", "--batch-key", "batch", "--covariate-key", "kind"], "(given as --covariate-key)"),
        (["integrate", "{data}", "--batch-key", "batch", "--covariate-key", "batch"], "leave it out of --covariate-key"),
    ],
)
def test_application_errors_name_the_commands_options(run, tmp_path, command, expected):
    """Errors raised by genailab.apps reach the command line in its own options, never as Python arguments."""
    run_dir, data = run
    args = [a.format(run=run_dir, data=data) for a in command] + ["--out", str(tmp_path / "out.h5ad")]
    if command[0] == "integrate":
        args[-1] = str(tmp_path / "int")
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and expected in result.output, result.output
    python_terms = ("key_added", "labels_key", "covariate_keys", "condition_keys", "conditions[", "None", "`")
    assert "Traceback" not in result.output and not [t for t in python_terms if t in result.output]


@pytest.mark.parametrize(
    "command",
    [["embed"], ["denoise"], ["cluster"], ["generate", "--n", "5", "--source", "posterior", "--data"]],
)
def test_no_command_replaces_its_input_file(run, tmp_path, command):
    """generate --data DATA --out DATA would replace the user's cells with generated ones."""
    run_dir, data = run
    copy = tmp_path / "cells.h5ad"
    copy.write_bytes(data.read_bytes())
    args = [command[0], run_dir, *command[1:], copy] if command[0] == "generate" else [command[0], run_dir, copy]
    result = CliRunner().invoke(main, [str(a) for a in args] + ["--out", str(tmp_path / "." / "cells.h5ad")])
    assert result.exit_code == 2 and "is the input file DATA" in result.output, result.output
    assert "cells_genailab.h5ad" in result.output and "Traceback" not in result.output
    assert copy.read_bytes() == data.read_bytes()


def test_generate_without_a_condition_suggests_the_option(run, tmp_path):
    """The error suggested Python's conditions={'batch': ...} on the command line."""
    run_dir, _ = run
    result = CliRunner().invoke(main, ["generate", str(run_dir), "--n-cells", "5", "--condition", "cell_type=type_0",
                                       "--out", str(tmp_path / "g.h5ad")])  # fmt: skip
    assert result.exit_code == 2 and "e.g. --condition batch=batch_0 (known: ['batch_0', 'batch_1'])" in result.output
    assert "conditions" not in result.output and not (tmp_path / "g.h5ad").exists()


def test_perturb_evaluate_names_hidden_when_its_sizes_are_not_numbers(run, tmp_path):
    _, data = run
    result = CliRunner().invoke(main, ["perturb", "evaluate", str(data), "--hidden", "abc", "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 2 and "Invalid value for '--hidden'" in result.output, result.output
