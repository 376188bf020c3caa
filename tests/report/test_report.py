"""`genailab evaluate` end to end: metrics.json, figures, a self-contained page that Chromium renders."""

from __future__ import annotations

import json
import re
import shutil
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from genailab import VAE
from genailab.cli import main
from genailab.data import simulate
from genailab.report import write_report
from genailab.report.page import Section, render_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A saved 5-epoch NB run on 300 simulated cells (2 batches, 3 types) and its h5ad."""
    folder = tmp_path_factory.mktemp("evaluate")
    adata = simulate(300, 60, n_cell_types=3, n_batches=2, seed=1)
    model = VAE(adata, likelihood="nb", layer="counts", condition_keys=["batch"], hidden_dims=(32,), latent_dim=3)
    model.fit(epochs=5, batch_size=64, validation_fraction=0.2, progress=False)
    model.save(folder / "run")
    adata.write_h5ad(folder / "data.h5ad")
    return folder, adata


@pytest.fixture(scope="module")
def report(run):
    folder, _ = run
    out = folder / "report"
    result = CliRunner().invoke(main, [
        "evaluate", str(folder / "run"), str(folder / "data.h5ad"), "--out", str(out), "--label-key", "cell_type",
        "--batch-key", "batch", "--latent-sweep", "2,3", "--sweep-epochs", "2", "--n-samples", "10",
    ])
    assert result.exit_code == 0, result.output
    assert "Report in" in result.output
    # without a terminal, each stage logs a line (a scheduler's log shows how far it got)
    assert "evaluate: held-out likelihood on 60 cells" in result.output
    assert "evaluate: latent-dimension sweep over [2, 3]" in result.output
    return out


def test_evaluate_writes_metrics_and_figures(report):
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["run"]["held_out_cells"] == "validation cells of the training data"
    assert metrics["run"]["n_held_out"] == 60
    likelihood = metrics["likelihood"]
    assert likelihood["negative_elbo"] == pytest.approx(likelihood["reconstruction"] + likelihood["kl"])
    assert likelihood["marginal_ll"] >= -likelihood["negative_elbo"] - 1.0  # IWAE tightens the ELBO (noise aside)
    assert {"ari", "nmi", "label_silhouette", "batch_entropy", "ilisi", "batch_silhouette"} <= set(metrics["latent"])
    assert set(metrics["generation"]["per_condition"]) == {"batch_0", "batch_1"}
    assert metrics["differential_expression"]["generated_from"] == "posterior"  # cell_type is no condition
    assert [row["latent_dim"] for row in metrics["latent_sweep"]] == [2, 3]
    for name in ("training_curves", "latent_umap", "gene_agreement", "latent_sweep"):
        assert (report / f"{name}.png").stat().st_size > 1000


def test_page_is_self_contained(report):
    page = (report / "index.html").read_text()
    assert page.count("src='data:image/png;base64,") == 4
    assert not re.search(r"(src|href)=['\"](https?:|file:|/)", page)  # nothing fetched from elsewhere
    for heading in ("Likelihood (held-out cells)", "Latent space", "Latent-dimension sweep", "per_condition"):
        assert heading in page


def test_other_data_is_scored_on_every_cell(run, tmp_path):
    folder, adata = run
    other = adata[:120].copy()
    model = VAE.load(folder / "run", other)
    metrics = write_report(other, model, tmp_path, n_samples=5)
    assert metrics["run"]["held_out_cells"].startswith("every cell") and metrics["run"]["n_held_out"] == 120
    assert "ari" not in metrics["latent"] and "differential_expression" not in metrics


def test_unknown_obs_column_is_one_clean_line(run, tmp_path):
    folder, _ = run
    result = CliRunner().invoke(main, [
        "evaluate", str(folder / "run"), str(folder / "data.h5ad"), "--out", str(tmp_path), "--label-key", "nope",
    ])
    assert result.exit_code != 0 and "obs has no column 'nope'" in result.output


def test_page_tables_known_answer(tmp_path):
    metrics = {"ll": float("nan"), "dims": [2, 5], "per_condition": {"a": {"auc": 0.5}, "b": {"auc": 0.75}}}
    page = render_page("t", [Section("S", metrics)], tmp_path / "p.html").read_text()
    assert "<td class='value'>n/a</td>" in page and "<td class='value'>2, 5</td>" in page
    assert "<th></th><th>auc</th>" in page  # per-condition dict as a groups x metrics table
    assert "<td class='value'>b</td><td class='value'>0.75</td>" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium to run this check)")
def test_page_renders_in_headless_chromium(report, tmp_path):
    screenshot = tmp_path / "page.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={screenshot}", "--window-size=1200,2000", (report / "index.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    assert np.unique(pixels.reshape(-1, 3), axis=0).shape[0] > 50  # text, tables and plots, not a blank page
    assert np.mean(pixels.min(axis=2) < 200) > 0.02  # a visible share of the page is drawn, not white


def test_reports_refuse_backed_data_and_numeric_batches_before_writing(run, tmp_path):
    import anndata as ad

    from genailab.errors import ConfigError, InputDataError

    folder, adata = run
    backed = ad.read_h5ad(folder / "data.h5ad", backed="r")
    with pytest.raises(InputDataError, match="needs the data in memory"):
        write_report(backed, VAE.load(folder / "run", backed), tmp_path / "a")
    backed.file.close()
    with pytest.raises(ConfigError, match="holds numbers"):
        write_report(adata, VAE.load(folder / "run", adata), tmp_path / "b", batch_key="library_size")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_training_cells_are_never_called_held_out(tmp_path):
    adata = simulate(200, 40, n_cell_types=2, n_batches=1, seed=2)
    model = VAE(adata, likelihood="nb", layer="counts", hidden_dims=(16,), latent_dim=2)
    model.fit(epochs=2, batch_size=64, validation_fraction=0.0, progress=False)
    metrics = write_report(adata, model, tmp_path / "r", n_samples=3)
    assert "all of them training cells" in metrics["run"]["held_out_cells"]


def test_report_figures_keep_the_users_matplotlib_backend(tmp_path):
    """Importing the report and writing a figure leave a notebook's backend (here svg) in place."""
    script = (
        "import matplotlib; matplotlib.use('svg')\n"
        "from genailab.report.figures import plot_training_curves\n"
        f"plot_training_curves([{{'epoch': 0, 'train_elbo_loss': 2.0, 'train_reconstruction': 1.5, 'train_kl': 0.5}}], r'{tmp_path / 'c.png'}')\n"
        "import matplotlib.pyplot as plt\n"
        "print(matplotlib.get_backend(), len(plt.get_fignums()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={k: v for k, v in os.environ.items() if k != "MPLBACKEND"})  # fmt: skip
    assert result.stdout.split() == ["svg", "0"]
    assert Image.open(tmp_path / "c.png").format == "PNG"
