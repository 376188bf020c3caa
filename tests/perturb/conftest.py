"""Shared fixtures: a small simulated drug/dose dataset with known effects, and a model trained
without one (cell type, drug, dose) group."""

from __future__ import annotations

import pytest

from genailab.data.simulate import PerturbationSpec, simulate
from genailab.perturb import HoldoutSplit, ObsKeys, PerturbationModel

# drug_1 has its EC50 near 0.4 with seed 0: dose 1 gives ~80% of its full effect, between the
# ~12% of dose 0.1 and ~99% of dose 10 that the model sees in type_0.
HELD_OUT = ("type_0", "drug_1", 1.0)
MODEL_OPTIONS = dict(layer="counts", latent_dim=8, hidden_dims=(64,))


@pytest.fixture(scope="session")
def held_out():
    """The (cell type, drug, dose) group the ``trained`` model never saw."""
    return HELD_OUT


@pytest.fixture(scope="session")
def model_options():
    """Small-model options shared by the tests (a fresh dict each time)."""
    return dict(MODEL_OPTIONS)


@pytest.fixture(scope="session")
def perturb_adata():
    """1500 cells x 100 genes, 2 cell types, 2 drugs at doses 0.1, 1, 10, a quarter controls."""
    spec = PerturbationSpec(n_drugs=2, doses=(0.1, 1.0, 10.0), n_target_genes=20, max_log_fc=2.5)
    return simulate(1500, 100, n_cell_types=2, n_batches=1, perturbation=spec, seed=0)


@pytest.fixture(scope="session")
def held_out_mask(perturb_adata):
    return HoldoutSplit("combination", (HELD_OUT,)).test_mask(perturb_adata.obs, ObsKeys())


@pytest.fixture(scope="module")
def trained(perturb_adata, held_out_mask):
    """A model trained on every cell except the HELD_OUT group (do not modify it in tests)."""
    model = PerturbationModel(perturb_adata[~held_out_mask].copy(), **MODEL_OPTIONS)
    return model.fit(epochs=40, seed=0, progress=False)


@pytest.fixture()
def controls(perturb_adata):
    """Control cells of type_0 (a copy)."""
    obs = perturb_adata.obs
    return perturb_adata[((obs["drug"] == "control") & (obs["cell_type"] == "type_0")).to_numpy()].copy()
