"""Latent-space metrics on latents with known structure: separated clusters, mixed or split batches."""

from __future__ import annotations

import numpy as np
import pytest

from genailab.errors import ConfigError, InputDataError
from genailab.eval import (
    batch_silhouette,
    knn_batch_entropy,
    knn_batch_inverse_simpson,
    label_silhouette,
    leiden_ari_nmi,
    leiden_ari_nmi_best_resolution,
)

N_PER_TYPE = 40


@pytest.fixture(scope="module")
def clusters():
    """Three tight, far-apart cell-type clusters in 5-D, 40 cells each, and a random batch (2 levels)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], N_PER_TYPE)
    centres = {"a": np.zeros(5), "b": np.full(5, 20.0), "c": np.r_[20.0, -20.0, 0, 0, 0]}
    latent = np.stack([centres[label] for label in labels]) + rng.normal(size=(labels.size, 5))
    batch = np.tile([0, 1], labels.size // 2)  # independent of position within each cluster
    return latent, labels, batch


def test_separated_clusters_are_recovered(clusters):
    latent, labels, _ = clusters
    scores = leiden_ari_nmi(latent, labels, resolution=0.5, seed=0)
    assert scores["ari"] == pytest.approx(1.0)
    assert scores["nmi"] == pytest.approx(1.0)
    assert scores["n_clusters"] == 3
    best = leiden_ari_nmi_best_resolution(latent, labels, resolutions=(0.2, 1.0, 5.0))
    assert best["nmi"] == pytest.approx(1.0) and best["resolution"] in (0.2, 1.0)
    assert label_silhouette(latent, labels) > 0.9


def test_unstructured_latent_scores_low():
    rng = np.random.default_rng(1)
    latent, labels = rng.normal(size=(180, 5)), np.repeat([0, 1, 2], 60)
    assert leiden_ari_nmi(latent, labels)["ari"] < 0.1
    assert label_silhouette(latent, labels) == pytest.approx(0.5, abs=0.05)


def test_mixed_batches_score_near_one(clusters):
    latent, labels, batch = clusters
    assert knn_batch_entropy(latent, batch, k=30) > 0.95
    assert knn_batch_inverse_simpson(latent, batch, k=30) > 0.9
    assert batch_silhouette(latent, batch, labels) > 0.85


def test_separated_batches_score_near_zero(clusters):
    latent, labels, batch = clusters
    split = latent + 100.0 * batch[:, None]
    assert knn_batch_entropy(split, batch, k=30) == pytest.approx(0.0)
    assert knn_batch_inverse_simpson(split, batch, k=30) == pytest.approx(0.0)
    assert batch_silhouette(split, batch, labels) < 0.1


def test_entropy_and_inverse_simpson_by_hand():
    """Six points on a line in three far-apart pairs; neighbours worked out by hand."""
    latent = np.array([[0.0], [1.0], [10.0], [10.5], [30.0], [30.5]])
    batch = np.array(["x", "y", "x", "x", "y", "y"])
    # k=1: a single neighbour is always one batch, so entropy 0 and inverse Simpson 1
    assert knn_batch_entropy(latent, batch, k=1) == pytest.approx(0.0)
    assert knn_batch_inverse_simpson(latent, batch, k=1) == pytest.approx(0.0)
    neighbours = {0: [1, 2], 1: [0, 2], 2: [3, 1], 3: [2, 1], 4: [5, 3], 5: [4, 3]}  # k=2
    entropies, simpsons = [], []
    for idx in neighbours.values():
        p = np.array([np.mean(batch[idx] == b) for b in ("x", "y")])
        entropies.append(-np.sum(p[p > 0] * np.log(p[p > 0])) / np.log(2))
        simpsons.append(1 / np.sum(p**2))
    assert knn_batch_entropy(latent, batch, k=2) == pytest.approx(np.mean(entropies))
    assert knn_batch_inverse_simpson(latent, batch, k=2) == pytest.approx(np.median(simpsons) - 1)


def test_bad_input_is_refused(clusters):
    latent, labels, batch = clusters
    with pytest.raises(InputDataError, match="one entry per cell"):
        label_silhouette(latent, labels[:-1])
    with pytest.raises(InputDataError, match="at least two batches"):
        knn_batch_inverse_simpson(latent, np.zeros(latent.shape[0]))
    with pytest.raises(ConfigError, match="k="):
        knn_batch_entropy(latent, batch, k=latent.shape[0])
    with pytest.raises(InputDataError, match="NaN"):
        leiden_ari_nmi(np.full_like(latent, np.nan), labels)
    with pytest.raises(InputDataError, match="no label"):
        batch_silhouette(latent, labels, labels)


def test_leiden_runs_above_scanpys_approximate_neighbour_threshold():
    """More than 8192 cells, where scanpy would otherwise switch to approximate PyNNDescent neighbours."""
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b"], 4200)
    latent = np.where(labels[:, None] == "a", 0.0, 15.0) + rng.normal(size=(labels.size, 3))
    assert leiden_ari_nmi(latent, labels, resolution=0.05)["ari"] == pytest.approx(1.0)
