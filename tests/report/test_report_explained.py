"""The report explains itself: a line per metric, the cells used, provenance, flagged AUCs, scanpy UMAPs."""

from __future__ import annotations

import hashlib
import html
import json

import pytest
import scanpy as sc

import genailab
from genailab import VAE
from genailab.data import simulate
from genailab.eval.latent import SCIB_RESOLUTIONS
from genailab.report import write_report
from genailab.report.metric_notes import NOTES
from genailab.report.page import AUC_FLAG, Section, render_page

pytestmark = pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")  # inside scanpy
COMMAND = "genailab evaluate run data.h5ad --out report --label-key cell_type --batch-key batch --seed 3"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """write_report on a 3-epoch NB model of 300 simulated cells (2 batches, 3 types), read from an h5ad;
    scanpy's UMAP plot is watched to see that it drew the figure."""
    folder = tmp_path_factory.mktemp("explained")
    adata = simulate(300, 60, n_cell_types=3, n_batches=2, seed=1)
    adata.write_h5ad(folder / "data.h5ad")
    model = VAE(adata, likelihood="nb", layer="counts", condition_keys=["batch"], hidden_dims=(32,), latent_dim=3)
    model.fit(epochs=3, batch_size=64, validation_fraction=0.2, progress=False)
    drawn = []
    with pytest.MonkeyPatch.context() as patch:
        umap = sc.pl.umap
        patch.setattr(sc.pl, "umap", lambda data, **kw: drawn.append(kw["color"]) or umap(data, **kw))
        metrics = write_report(adata, model, folder / "report", label_key="cell_type", batch_key="batch",
                               n_samples=5, seed=3, data_path=folder / "data.h5ad", command=COMMAND)  # fmt: skip
    return folder, metrics, (folder / "report" / "index.html").read_text(), drawn


def test_provenance_is_recorded(report):
    folder, metrics, page, _ = report
    provenance = metrics["provenance"]
    assert provenance["genailab_version"] == genailab.__version__
    assert provenance["data_file"] == str((folder / "data.h5ad").resolve())
    assert provenance["data_sha256"] == hashlib.sha256((folder / "data.h5ad").read_bytes()).hexdigest()
    assert provenance["seed"] == 3 and provenance["command"] == COMMAND
    assert provenance["date"].endswith("+00:00")  # UTC, ISO 8601
    assert json.loads((folder / "report" / "metrics.json").read_text())["provenance"] == provenance
    for value in (genailab.__version__, provenance["data_sha256"], provenance["date"], COMMAND, "Provenance"):
        assert html.escape(value) in page


def test_each_metric_is_explained_with_the_cells_it_used(report):
    _, metrics, page, _ = report
    for section in ("likelihood", "latent"):
        for name in metrics[section]:
            assert name in NOTES[section], f"{section}.{name} has no explanation"
            assert html.escape(NOTES[section][name]) in page
    for name in metrics["generation"]["overall"]:
        assert html.escape(NOTES["generation"][name]) in page
    assert "Computed on: 60 validation cells of the training data" in page
    assert "Computed on: the posterior means of every cell of the data (300 cells)" in page
    for line in (NOTES["latent"]["ilisi"], NOTES["latent"]["best_nmi"], NOTES["generation"]["classifier_auc"]):
        assert "better" in line or "best" in line  # each line says which direction is better


def test_latent_reports_scib_metrics_and_the_resolution_sweep(report):
    _, metrics, _, _ = report
    latent = metrics["latent"]
    assert latent["resolution"] == 1.0 and latent["best_resolution"] in SCIB_RESOLUTIONS
    assert latent["best_nmi"] >= latent["nmi"]  # 1.0 is one of the swept resolutions, on the same graph
    for name in ("ilisi", "clisi", "kbet", "kbet_per_label", "graph_connectivity", "knn_batch_inverse_simpson"):
        assert 0.0 <= latent[name] <= 1.0


def test_umap_is_drawn_by_scanpy(report):
    folder, _, page, drawn = report
    assert drawn == ["cell_type", "batch"]
    assert (folder / "report" / "latent_umap.png").stat().st_size > 10_000
    assert "UMAP of the posterior means" in page


def test_classifier_auc_below_half_is_flagged(tmp_path):
    metrics = {
        "overall": {"classifier_auc": 0.43, "energy_distance": 0.2},
        "per_condition": {"a": {"classifier_auc": 0.61}, "b": {"classifier_auc": 0.38}},
    }
    page = render_page("t", [Section("S", metrics, notes=NOTES["generation"])], tmp_path / "p.html").read_text()
    assert page.count(AUC_FLAG) == 2 * 2  # the 0.43 and the 0.38, each in the cell text and its tooltip
    assert f"0.43 ({AUC_FLAG})" in page and f"0.38 ({AUC_FLAG})" in page
    assert "<td class='value'>0.61</td>" in page
    assert html.escape(NOTES["generation"]["classifier_auc"]) in page  # the legend under the per-condition table
    unflagged = render_page("t", [Section("S", {"classifier_auc": 0.5})], tmp_path / "q.html").read_text()
    assert AUC_FLAG not in unflagged
