"""integration_scores on the simulator's true latent: scIB's metrics, the kNN summaries and the Leiden sweep."""

from __future__ import annotations

import numpy as np
import pytest

from genailab.apps import integration_scores
from genailab.data.simulate import simulate
from genailab.eval import (
    clisi,
    graph_connectivity,
    ilisi,
    kbet,
    kbet_per_label,
    knn_batch_inverse_simpson,
    leiden_ari_nmi,
)
from genailab.eval.latent import SCIB_RESOLUTIONS


def test_scores_are_the_eval_metrics_at_scibs_sizes():
    adata = simulate(600, 50, n_cell_types=3, n_batches=2, batch_effect_scale=0.5, seed=4)
    scores = integration_scores(adata, batch_key="batch", label_key="cell_type", key="X_true_latent")
    latent = np.asarray(adata.obsm["X_true_latent"])
    batch, labels = adata.obs["batch"].astype(str).to_numpy(), adata.obs["cell_type"].astype(str).to_numpy()
    assert scores["ilisi"] == pytest.approx(ilisi(latent, batch, perplexity=30))
    assert scores["clisi"] == pytest.approx(clisi(latent, labels, perplexity=30))
    assert scores["kbet"] == pytest.approx(kbet(latent, batch, n_neighbors=50))
    assert scores["kbet_per_label"] == pytest.approx(kbet_per_label(latent, batch, labels, n_neighbors=50))
    assert scores["graph_connectivity"] == pytest.approx(graph_connectivity(latent, labels, n_neighbors=15))
    assert scores["knn_batch_inverse_simpson"] == pytest.approx(knn_batch_inverse_simpson(latent, batch, k=30))
    # the true latent holds no batch effect and keeps the types apart
    assert scores["ilisi"] > 0.8 and scores["kbet_per_label"] > 0.8 and scores["clisi"] > 0.95 and scores["graph_connectivity"] > 0.95
    assert scores["leiden_resolution"] in SCIB_RESOLUTIONS
    at_best = leiden_ari_nmi(latent, labels, resolution=scores["leiden_resolution"])
    assert scores["nmi"] == pytest.approx(at_best["nmi"]) and scores["ari"] == pytest.approx(at_best["ari"])


def test_unlabelled_cells_are_left_out_of_the_label_scores(caplog):
    """NaN labels became a label called "nan", scored with the others."""
    adata = simulate(600, 50, n_cell_types=3, n_batches=2, batch_effect_scale=0.5, seed=4)
    labels = adata.obs["cell_type"].astype(object)
    labels[::3] = np.nan
    adata.obs["partial"] = labels
    with caplog.at_level("WARNING", logger="genailab"):
        scores = integration_scores(adata, batch_key="batch", label_key="partial", key="X_true_latent")
    assert "200 of 600 cells have no 'partial'" in caplog.text
    kept = adata[adata.obs["partial"].notna()]
    latent, known = np.asarray(kept.obsm["X_true_latent"]), kept.obs["partial"].astype(str).to_numpy()
    assert scores["clisi"] == pytest.approx(clisi(latent, known, perplexity=30))
    assert scores["graph_connectivity"] == pytest.approx(graph_connectivity(latent, known, n_neighbors=15))
