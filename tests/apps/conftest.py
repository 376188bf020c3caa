"""One small trained ZINB model shared by the application tests (tests copy the data before writing)."""

from __future__ import annotations

import pytest

from genailab import VAE, TrainConfig
from genailab.data.simulate import simulate


@pytest.fixture(scope="session")
def app_data():
    """600 cells x 200 genes, 3 cell types, 2 batches, ZINB counts (dropout 0.1), seed 0."""
    return simulate(600, 200, n_cell_types=3, n_batches=2, likelihood="zinb", dropout=0.1, seed=0)


@pytest.fixture(scope="session")
def app_model(app_data):
    """A ZINB VAE conditioned on batch and cell type, as in the seed, trained 40 epochs."""
    model = VAE(app_data, likelihood="zinb", layer="counts", condition_keys=["batch", "cell_type"], latent_dim=6,
                hidden_dims=(64,))  # fmt: skip
    return model.fit(TrainConfig(epochs=40, seed=0, progress=False))
