"""cluster(labels_key=...): ARI/NMI at the chosen resolution and at the best of scIB's resolution sweep."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from genailab.apps import cluster
from genailab.errors import InputDataError
from genailab.eval import leiden_ari_nmi


def test_fixed_and_best_resolution_are_recorded(app_data, app_model):
    adata = app_data.copy()
    cluster(adata, app_model, resolution=2.0, labels_key="cell_type", seed=0)
    scores = adata.uns["leiden"]["scores"]
    labels = adata.obs["cell_type"].astype(str)
    assert scores["resolution"] == 2.0 and scores["labels_key"] == "cell_type"
    assert scores["ari"] == pytest.approx(adjusted_rand_score(labels, adata.obs["leiden"]))
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(labels, adata.obs["leiden"]))
    # 2.0 is one of the swept resolutions and the graph is the same, so the best NMI is at least the fixed one
    assert scores["best_nmi"] >= scores["nmi"]
    assert 0.1 <= scores["best_resolution"] <= 2.0
    again = leiden_ari_nmi(adata.obsm["X_genailab"], labels.to_numpy(), resolution=scores["best_resolution"], seed=0)
    assert again["nmi"] == pytest.approx(scores["best_nmi"]) and again["ari"] == pytest.approx(scores["best_ari"])
    assert again["n_clusters"] == scores["best_n_clusters"]
    assert np.isfinite([scores[k] for k in ("ari", "nmi", "best_ari", "best_nmi")]).all()


def test_unknown_labels_column(app_data, app_model):
    with pytest.raises(InputDataError, match="labels_key"):
        cluster(app_data.copy(), app_model, labels_key="nope")
