"""Nonsense numeric arguments of the applications are a ConfigError naming the argument, before any
work; the same values on the command line name the command's option."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from genailab.apps import cluster, denoise, differential_expression, generate, generated_vs_real, integration_scores
from genailab.cli import main
from genailab.errors import ConfigError

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("options, message", [
    (dict(n_cells=0), "n_cells must be a whole number >= 1, got 0."),
    (dict(n_cells=NAN), "n_cells must be a whole number >= 1, got nan."),
    (dict(n_cells=10, library_size=INF), "library_size must be a positive finite number, got inf."),
    (dict(n_cells=10, library_size=0.0), "library_size must be a positive number, got 0."),
    (dict(n_cells=10, library_size=1e39), "library_size=1e+39 overflows float32"),
    (dict(n_cells=10, seed=-1), "seed must be a non-negative whole number, got -1."),
])
def test_generate_refuses_nonsense(app_data, app_model, options, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        generate(app_data, app_model, **options)
    assert info.value.argument in options


@pytest.mark.parametrize("options, message", [
    (dict(fdr_target=1.0), "fdr_target must be a number in (0, 1), got 1."),
    (dict(fdr_target=NAN), "fdr_target is NaN"),
    (dict(delta=NAN), "delta is NaN; give a non-negative number."),
    (dict(delta=-0.5), "delta must be a non-negative number, got -0.5."),
    (dict(pseudocount=0.0), "pseudocount must be a positive number, got 0."),
    (dict(n_pairs=0), "n_pairs must be a whole number >= 1, got 0."),
    (dict(n_samples_per_cell=0), "n_samples_per_cell must be a whole number >= 1, got 0."),
    (dict(max_cells=2.5), "max_cells must be a whole number >= 1, got 2.5."),
])
def test_differential_expression_refuses_nonsense(app_data, app_model, options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        differential_expression(app_data, app_model, groupby="cell_type", group="type_0", **options)


@pytest.mark.parametrize("options, message", [
    (dict(library_size=INF), "library_size must be a positive finite number, got inf."),
    (dict(library_size=-1.0), "library_size must be a positive number, got -1."),
    (dict(library_size="all"), "library_size must be a positive number or 'observed' (each cell's own total), got 'all'."),
    (dict(n_samples=0), "n_samples must be a whole number >= 1, got 0."),
])
def test_denoise_refuses_nonsense(app_data, app_model, options, message):
    adata = app_data.copy()
    with pytest.raises(ConfigError, match=re.escape(message)):
        denoise(adata, app_model, **options)
    assert "genailab_denoised" not in adata.layers


@pytest.mark.parametrize("options, message", [
    (dict(resolution=0.0), "resolution must be a positive number, got 0."),
    (dict(resolution=NAN), "resolution is NaN"),
    (dict(n_neighbors=1), "n_neighbors must be a whole number in [2, 599], got 1."),
    (dict(n_neighbors=10_000), "n_neighbors must be a whole number in [2, 599], got 10000."),
])
def test_cluster_refuses_nonsense(app_data, app_model, options, message):
    adata = app_data.copy()
    with pytest.raises(ConfigError, match=re.escape(message)):
        cluster(adata, app_model, **options)
    assert "X_genailab" not in adata.obsm  # refused before the work


def test_scores_refuse_nonsense(app_data):
    with pytest.raises(ConfigError, match=re.escape("n_neighbors must be a whole number >= 1, got 0.")):
        integration_scores(app_data, batch_key="batch", n_neighbors=0)
    counts = app_data.layers["counts"]
    with pytest.raises(ConfigError, match=re.escape("n_comps must be a whole number >= 1, got 0.")):
        generated_vs_real(counts, counts, n_comps=0)


def test_the_cli_names_its_own_options(app_data, app_model, tmp_path):
    run, data = tmp_path / "run", tmp_path / "data.h5ad"
    app_model.save(run)
    app_data.write_h5ad(data)
    for args, message in [
        (["generate", str(run), "--n", "0", "--out", str(tmp_path / "g.h5ad")], "--n-cells must be a whole number >= 1"),
        (["denoise", str(run), str(data), "--library-size", "inf", "--out", str(tmp_path / "d.h5ad")],
         "--library-size must be a positive finite number, got inf."),
        (["de", str(run), str(data), "--groupby", "cell_type", "--group", "type_0", "--fdr", "1.5", "--out",
          str(tmp_path / "de.csv")], "--fdr must be a number in (0, 1), got 1.5."),
        (["cluster", str(run), str(data), "--resolution", "-1", "--out", str(tmp_path / "c.h5ad")],
         "--resolution must be a positive number, got -1."),
    ]:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert f"ConfigError: {message}" in result.output and "Traceback" not in result.output


def test_transfer_labels_refuses_nonsense(app_data):
    from genailab.apps import transfer_labels

    cells = app_data[:50].copy()
    cells.obsm["X_genailab"] = cells.obsm["X_true_latent"]
    for options, message in [(dict(n_neighbors=2.5), "n_neighbors must be a whole number >= 1, got 2.5."),
                             (dict(unknown_threshold=float("nan")), "unknown_threshold is NaN"),
                             (dict(unknown_threshold=1.5), "unknown_threshold must be a number in [0, 1], got 1.5.")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            transfer_labels(cells, cells, label_key="cell_type", **options)
