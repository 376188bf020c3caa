"""kNN label transfer against a brute-force vote, sklearn's weighted classifier and the simulator's truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from scipy.spatial.distance import cdist
from sklearn.neighbors import KNeighborsClassifier

from genailab.apps import transfer_labels
from genailab.apps.transfer import _vote_weights
from genailab.data.simulate import simulate
from genailab.errors import ConfigError, InputDataError


def _cells(latent, labels=None):
    adata = AnnData(X=np.zeros((latent.shape[0], 1), dtype=np.float32))
    adata.obsm["X_genailab"] = latent
    if labels is not None:
        adata.obs["cell_type"] = pd.Categorical(labels)
    return adata


def test_votes_match_a_brute_force_kernel_vote():
    rng = np.random.default_rng(0)
    reference = _cells(rng.normal(size=(40, 3)), rng.choice(["A", "B", "C"], 40))
    query = _cells(rng.normal(size=(7, 3)))
    predicted = transfer_labels(query, reference, label_key="cell_type", n_neighbors=6, unknown_threshold=1.0)
    distances = cdist(query.obsm["X_genailab"], reference.obsm["X_genailab"])
    labels = reference.obs["cell_type"].astype(str).to_numpy()
    for i, row in enumerate(distances):
        nearest = np.argsort(row)[:6]
        d = row[nearest]
        w = np.exp(-((d / d.mean()) ** 2))
        totals = {name: w[labels[nearest] == name].sum() for name in "ABC"}
        best = max(totals, key=totals.get)
        assert predicted.iloc[i] == best
        assert query.obs["cell_type_transferred_uncertainty"].iloc[i] == pytest.approx(1 - totals[best] / w.sum(), abs=1e-6)


def test_shares_match_sklearn_weighted_classifier_on_simulated_batches():
    sim = simulate(900, 60, n_cell_types=4, n_batches=3, seed=3)
    reference, query = sim[sim.obs["batch"] != "batch_2"].copy(), sim[sim.obs["batch"] == "batch_2"].copy()
    for adata in (reference, query):
        adata.obsm["X_genailab"] = adata.obsm["X_true_latent"]
    predicted = transfer_labels(query, reference, label_key="cell_type", n_neighbors=15, unknown_threshold=1.0)
    classifier = KNeighborsClassifier(n_neighbors=15, weights=_vote_weights).fit(
        reference.obsm["X_genailab"], reference.obs["cell_type"].astype(str)
    )
    share = classifier.predict_proba(query.obsm["X_genailab"]).max(axis=1)
    np.testing.assert_allclose(1 - query.obs["cell_type_transferred_uncertainty"], share, atol=1e-6)
    np.testing.assert_array_equal(predicted.astype(str), classifier.predict(query.obsm["X_genailab"]))
    truth = query.obs["cell_type"].astype(str).to_numpy()
    accuracy = np.mean(predicted.astype(str).to_numpy() == truth)
    # the near-optimal rule for these Gaussian clouds: nearest reference centre of the true latent
    names = np.unique(reference.obs["cell_type"].astype(str))
    centres = np.stack([reference.obsm["X_genailab"][reference.obs["cell_type"] == n].mean(0) for n in names])
    nearest_centre = names[cdist(query.obsm["X_genailab"], centres).argmin(1)]
    assert accuracy >= np.mean(nearest_centre == truth) - 0.01  # measured 0.965 vs 0.972
    assert query.uns["cell_type_transferred"]["params"]["n_neighbors"] == 15


def test_uncertain_cells_are_called_unknown():
    rng = np.random.default_rng(1)
    # two overlapping clouds: cells between them get split votes
    reference = _cells(np.r_[rng.normal(-1, 1, (50, 2)), rng.normal(1, 1, (50, 2))], ["A"] * 50 + ["B"] * 50)
    query = _cells(rng.normal(0, 1, (30, 2)))
    transfer_labels(query, reference, label_key="cell_type", unknown_threshold=0.2, key_added="call")
    uncertain = query.obs["call_uncertainty"].to_numpy() > 0.2
    assert 0 < uncertain.sum() < 30
    np.testing.assert_array_equal(query.obs["call"].to_numpy() == "unknown", uncertain)
    assert query.uns["call"]["n_unknown"] == uncertain.sum()
    assert list(query.obs["call"].cat.categories) == ["A", "B", "unknown"]


def test_unlabelled_reference_cells_do_not_vote():
    reference = _cells(np.array([[0.0], [0.1], [5.0], [5.1]]), ["A", None, "B", "B"])
    query = _cells(np.array([[0.05]]))
    predicted = transfer_labels(query, reference, label_key="cell_type", n_neighbors=1)
    assert predicted.iloc[0] == "A"
    with pytest.raises(ConfigError, match="between 1 and the 3 labelled"):
        transfer_labels(query, reference, label_key="cell_type", n_neighbors=4)


def test_clear_errors():
    reference = _cells(np.zeros((5, 2)), ["A", "B", "unknown", "A", "B"])
    with pytest.raises(ConfigError, match=r"no obsm\['X_genailab'\]"):
        transfer_labels(AnnData(np.zeros((2, 1))), reference, label_key="cell_type")
    with pytest.raises(InputDataError, match="3 dimensions and the reference's 2"):
        transfer_labels(_cells(np.zeros((2, 3))), reference, label_key="cell_type")
    with pytest.raises(ConfigError, match="'unknown' is a reference label"):
        transfer_labels(_cells(np.zeros((2, 2))), reference, label_key="cell_type", n_neighbors=2)
    with pytest.raises(ConfigError, match="no column 'donor'"):
        transfer_labels(_cells(np.zeros((2, 2))), reference, label_key="donor")
    with pytest.raises(ConfigError, match="unknown_threshold"):
        transfer_labels(_cells(np.zeros((2, 2))), reference, label_key="cell_type", unknown_threshold=1.5)
    query = _cells(np.zeros((2, 2)), ["B", "A"])  # the query's own labels, e.g. to score the transfer
    with pytest.raises(ConfigError, match=r"key_added='cell_type' is the query's own obs\['cell_type'\]"):
        transfer_labels(query, reference, label_key="cell_type", key_added="cell_type", n_neighbors=2)
    assert list(query.obs["cell_type"]) == ["B", "A"]
    unlabelled = _cells(np.zeros((2, 2)))  # without labels of its own, the column is free
    transfer_labels(unlabelled, _cells(np.zeros((4, 2)), ["A", "B", "A", "B"]), label_key="cell_type",
                    key_added="cell_type", n_neighbors=2)  # fmt: skip
    assert "cell_type" in unlabelled.obs


def test_a_reference_without_any_label_is_named():
    import anndata as ad
    import numpy as np

    from genailab.apps import transfer_labels
    from genailab.errors import InputDataError

    rng = np.random.default_rng(0)
    reference, query = ad.AnnData(np.zeros((20, 3))), ad.AnnData(np.zeros((5, 3)))
    reference.obsm["X_genailab"], query.obsm["X_genailab"] = rng.normal(size=(20, 4)), rng.normal(size=(5, 4))
    reference.obs["cell_type"] = np.nan
    with pytest.raises(InputDataError, match=r"reference.obs\['cell_type'\] has no label"):
        transfer_labels(query, reference, label_key="cell_type")
