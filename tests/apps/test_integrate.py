"""Batch correction with and without the adversary, on simulated batches with known cell types."""

from __future__ import annotations

import numpy as np
import pytest

from genailab import TrainConfig
from genailab.apps import integrate, integration_scores
from genailab.data.preprocess import log_normalize
from genailab.model.adversary import BATCH_CORRECTION as DEFAULT_ADVERSARY
from genailab.data.simulate import simulate
from genailab.errors import ConfigError


@pytest.fixture(scope="module")
def batches():
    return simulate(400, 120, n_cell_types=3, n_batches=2, batch_effect_scale=0.5, seed=2)


def _batch_gap(adata, values) -> float:
    """Mean over cell types and genes of |mean in batch_0 - mean in batch_1|."""
    gaps = []
    for cell_type in adata.obs["cell_type"].cat.categories:
        in_type = (adata.obs["cell_type"] == cell_type).to_numpy()
        first = in_type & (adata.obs["batch"] == "batch_0").to_numpy()
        second = in_type & (adata.obs["batch"] == "batch_1").to_numpy()
        gaps.append(np.abs(values[first].mean(0) - values[second].mean(0)).mean())
    return float(np.mean(gaps))


def test_adversary_mixes_batches_and_keeps_cell_types(batches):
    train = TrainConfig(epochs=30, batch_size=32, seed=0, progress=False)
    scores = {}
    for name, adversary in (("plain", None), ("adversary", DEFAULT_ADVERSARY)):
        adata = batches.copy()
        model = integrate(adata, batch_key="batch", layer="counts", adversary=adversary, train=train, latent_dim=6,
                          hidden_dims=(64,))  # fmt: skip
        assert (model.adversary is None) == (adversary is None)
        scores[name] = integration_scores(adata, batch_key="batch", label_key="cell_type")
        # every cell decoded into the largest batch: the batch gap within cell types shrinks
        corrected_gap = _batch_gap(adata, np.log1p(adata.layers["genailab_corrected"]))
        assert corrected_gap < 0.5 * _batch_gap(adata, log_normalize(adata.layers["counts"]).toarray())
    plain, adversarial = scores["plain"], scores["adversary"]
    assert plain["knn_batch_entropy"] < 0.2  # the batch-conditioned VAE alone leaves batches apart here
    assert adversarial["knn_batch_entropy"] > plain["knn_batch_entropy"] + 0.4
    assert adversarial["label_silhouette"] > plain["label_silhouette"] - 0.05
    assert adversarial["nmi"] > plain["nmi"] - 0.05 and adversarial["ari"] > 0.8


def test_outputs_and_params(batches):
    adata = batches.copy()
    integrate(adata, batch_key="batch", layer="counts", reference_batch="batch_1", key_added="X_int",
              corrected_layer="fixed", train=TrainConfig(epochs=2, seed=0, progress=False), latent_dim=4,
              hidden_dims=(16,))  # fmt: skip
    assert adata.obsm["X_int"].shape == (400, 4)
    assert adata.layers["fixed"].shape == (400, 120)
    np.testing.assert_allclose(adata.layers["fixed"].sum(axis=1), 1e4, rtol=1e-3)
    params = adata.uns["X_int"]["params"]
    assert params["reference_batch"] == "batch_1" and params["adversary"]["weight"] == 5.0


def test_bad_options(batches):
    with pytest.raises(ConfigError, match="reference_batch"):
        integrate(batches.copy(), batch_key="batch", layer="counts", reference_batch="nope")
    with pytest.raises(ConfigError, match="covariate"):
        integrate(batches.copy(), batch_key="batch", layer="counts", covariate_keys=["batch"])
