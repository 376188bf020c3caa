"""Both perturbation generators: the simulator's drug pairs and the semi-synthetic PBMC screen."""

from __future__ import annotations

import numpy as np
import pytest

from genailab.data.simulate import PerturbationSpec, hill_response, simulate, true_counterfactual, true_drug_log_fc
from genailab.errors import ConfigError
from genailab.perturb import semisynthetic as pbmc


@pytest.fixture(scope="module")
def pairs_adata():
    spec = PerturbationSpec(n_drugs=3, doses=(1.0, 10.0), pair_fraction=0.5, interacting_pairs=1, n_target_genes=10)
    return simulate(3000, 60, n_cell_types=2, n_batches=1, n_markers=3, perturbation=spec, seed=3)


def test_simulator_makes_pairs_and_one_interacting_pair(pairs_adata):
    labels = set(pairs_adata.obs["drug"].astype(str))
    assert {"drug_0+drug_1", "drug_0+drug_2", "drug_1+drug_2"} <= labels
    (interacting,) = pairs_adata.uns["interacting_pairs"]
    extra = pairs_adata.varm[f"true_interaction_{interacting}"].to_numpy()
    assert (np.abs(extra).max(1) > 0).sum() == 10  # n_interaction_genes
    a, b = interacting.split("+")
    params = pairs_adata.uns["simulation"]["perturbation"]
    levels = [float(hill_response(10.0, params["ec50"][d], params["hill"])) for d in (a, b)]
    expected = (pairs_adata.varm[f"true_drug_effect_{a}"] * levels[0] + pairs_adata.varm[f"true_drug_effect_{b}"]
                * levels[1] + extra * levels[0] * levels[1])  # fmt: skip
    np.testing.assert_allclose(true_drug_log_fc(pairs_adata, interacting, 10.0), expected)
    # the cells of the pair carry exactly that log fold change over their basal means
    obs = pairs_adata.obs
    rows = np.flatnonzero(((obs["drug"] == interacting) & (obs["dose"] == 10.0) & (obs["cell_type"] == "type_0")).to_numpy())
    control = np.flatnonzero(((obs["drug"] == "control") & (obs["cell_type"] == "type_0")).to_numpy())
    mean = np.asarray(pairs_adata.layers["true_mean"])
    lib = obs["library_size"].to_numpy()[:, None]
    observed = np.log((mean[rows] / lib[rows]).mean(0)) - np.log((mean[control] / lib[control]).mean(0))
    assert np.corrcoef(observed, expected["type_0"])[0, 1] > 0.95


def test_simulator_counterfactual_matches_the_true_mean(pairs_adata):
    control = pairs_adata[(pairs_adata.obs["drug"] == "control").to_numpy()]
    draws = np.mean([true_counterfactual(control, drug="drug_0", dose=10.0, seed=s) for s in range(20)], axis=0)
    fc = true_drug_log_fc(pairs_adata, "drug_0", 10.0)
    expected = np.asarray(control.layers["true_mean"]) * np.exp(fc[control.obs["cell_type"].astype(str)].to_numpy().T)
    np.testing.assert_allclose(draws.sum(0), expected.sum(0), rtol=0.1)
    with pytest.raises(ConfigError, match="interacting_pairs"):
        PerturbationSpec(n_drugs=3, interacting_pairs=1)


@pytest.fixture(scope="module")
def screen():
    return pbmc.semisynthetic(n_cells=1500, n_drugs=2, doses=(0.5, 5.0), seed=1)


def test_semisynthetic_keeps_real_cells_and_applies_known_effects(screen):
    from genailab.data import pbmc68k_counts

    real = pbmc68k_counts()
    assert screen.n_vars == real.n_vars and list(screen.var_names) == list(real.var_names)
    obs = screen.obs
    # controls: expected totals equal the source cells' real library sizes
    control = (obs["drug"] == "control").to_numpy()
    real_totals = np.asarray(real.layers["counts"].sum(1)).ravel()
    source = real.obs_names.get_indexer(obs["source_cell"])
    np.testing.assert_allclose(np.asarray(screen.layers["true_mean"])[control].sum(1), real_totals[source[control]],
                               rtol=1e-4)  # fmt: skip
    # treated cells: true mean = basal mean x exp(true log fold change) of their type
    treated = np.flatnonzero((obs["drug"] == "drug_1").to_numpy())[:50]
    basal = {s: i for i, s in zip(np.flatnonzero(control), obs["source_cell"].to_numpy()[control])}
    with_basal = [i for i in treated if obs["source_cell"].iloc[i] in basal]
    assert with_basal
    for i in with_basal[:10]:
        fc = pbmc.true_log_fc(screen, "drug_1", float(obs["dose"].iloc[i]))[str(obs["cell_type"].iloc[i])].to_numpy()
        np.testing.assert_allclose(screen.layers["true_mean"][i],
                                   screen.layers["true_mean"][basal[obs["source_cell"].iloc[i]]] * np.exp(fc),
                                   rtol=1e-4)  # fmt: skip
    effect = screen.varm["true_drug_effect_drug_0"].to_numpy()
    assert ((np.abs(effect) > 0).any(1)).sum() == 30
    assert screen.uns["interacting_pairs"] == ["drug_0+drug_1"]


def test_semisynthetic_counts_are_poisson_around_the_true_mean(screen):
    control = screen[(screen.obs["drug"] == "control").to_numpy()]
    counts = np.asarray(control.layers["counts"].sum(0)).ravel()
    expected = np.asarray(control.layers["true_mean"]).sum(0)
    busy = expected > 50
    z = (counts[busy] - expected[busy]) / np.sqrt(expected[busy])
    assert abs(z.mean()) < 0.3 and 0.7 < z.std() < 1.3
    draw = pbmc.true_counterfactual(control, drug="drug_0", dose=5.0, seed=0)
    assert draw.shape == control.shape and (draw == np.round(draw)).all()
