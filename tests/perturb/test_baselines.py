"""Baselines and metrics on hand-made examples."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from sklearn.metrics import r2_score as sklearn_r2

from genailab.errors import InputDataError, SchemaMismatchError
from genailab.perturb import (
    AdditiveShift, MatchingMean, NoChange, ObsKeys, Oracle, PerturbedMean, RidgeCovariates, log_normalize,
    perturbation_metrics, r2_score,
)  # fmt: skip
from genailab.perturb.baselines import combined_shift, drug_shift

KEYS = ObsKeys()


def _hand_adata() -> AnnData:
    """Two genes, every cell with 10,000 counts, so log-normalised values are log1p(counts)."""
    rows = [
        ("A", "control", 0.0, [5000, 5000]),
        ("A", "control", 0.0, [5000, 5000]),
        ("A", "x", 1.0, [9000, 1000]),
        ("A", "y", 1.0, [6000, 4000]),
        ("B", "control", 0.0, [2000, 8000]),
        ("B", "x", 1.0, [4000, 6000]),
        ("B", "x", 10.0, [7000, 3000]),
    ]
    obs = pd.DataFrame({"cell_type": [r[0] for r in rows], "drug": [r[1] for r in rows], "dose": [r[2] for r in rows]},
                       index=[f"c{i}" for i in range(len(rows))])  # fmt: skip
    return AnnData(X=np.array([r[3] for r in rows], dtype=np.float32), obs=obs)


def test_additive_baseline_is_control_plus_the_drug_shift_by_hand():
    adata = _hand_adata()
    baseline = AdditiveShift().fit(adata, keys=KEYS)
    control_a, control_b = adata[[0, 1]], adata[[4]]
    log = np.log1p
    # type A saw x and y at dose 1: its own shifts are used
    shift_x_a = log([9000, 1000]) - log([5000, 5000])
    shift_y_a = log([6000, 4000]) - log([5000, 5000])
    np.testing.assert_allclose(baseline.predict(control_a, drug="x", dose=1.0), log([[5000, 5000]] * 2) + shift_x_a)
    np.testing.assert_allclose(
        baseline.predict(control_a, drug="x+y", dose=1.0), log([[5000, 5000]] * 2) + shift_x_a + shift_y_a
    )
    # type B never saw y: the average over the types that did (only A)
    np.testing.assert_allclose(baseline.predict(control_b, drug="y", dose=1.0), log([[2000, 8000]]) + shift_y_a)
    # type B saw x at 1 and 10: dose 3 is interpolated in log dose, weight log(3) / log(10) on dose 10
    shift_1, shift_10 = log([4000, 6000]) - log([2000, 8000]), log([7000, 3000]) - log([2000, 8000])
    w = np.log(3.0) / np.log(10.0)
    np.testing.assert_allclose(baseline.predict(control_b, drug="x", dose=3.0),
                               log([[2000, 8000]]) + (1 - w) * shift_1 + w * shift_10)  # fmt: skip
    # outside the seen doses the nearest end is kept
    np.testing.assert_allclose(baseline.predict(control_b, drug="x", dose=100.0), log([[2000, 8000]]) + shift_10)
    np.testing.assert_allclose(baseline.predict(control_b, drug="x", dose=0.01), log([[2000, 8000]]) + shift_1)
    with pytest.raises(SchemaMismatchError, match="never seen"):
        baseline.predict(control_a, drug="z", dose=1.0)


def test_log_dose_interpolation_between_seen_doses():
    a, b = np.array([1.0, -2.0]), np.array([3.0, 4.0])
    table = {("d", 0.1): a, ("d", 10.0): b}
    # dose 1 is halfway between 0.1 and 10 in log dose (the old nearest-dose rule returned a)
    np.testing.assert_allclose(combined_shift(table, "d", 1.0, KEYS), (a + b) / 2)
    np.testing.assert_allclose(drug_shift(table, "d", 10 ** -0.5), 0.75 * a + 0.25 * b)
    np.testing.assert_allclose(drug_shift(table, "d", 0.0), [0.0, 0.0])
    np.testing.assert_allclose(combined_shift({**table, ("e", 1.0): a}, "d+e", 1.0, KEYS), (a + b) / 2 + a)


def test_perturbed_mean_matching_mean_and_ridge_pair_terms_by_hand():
    adata = _hand_adata()
    log = np.log1p
    control_a = adata[[0, 1]]
    # perturbed mean of type A: mean of its three treated cells minus its control mean, whatever the drug
    shift = np.mean(log([[9000, 1000], [6000, 4000]]), axis=0) - log([5000, 5000])
    predicted = PerturbedMean().fit(adata, keys=KEYS).predict(control_a, drug="y", dose=5.0)
    np.testing.assert_allclose(predicted, log([[5000, 5000]] * 2) + shift)
    matching = MatchingMean().fit(adata, keys=KEYS).predict(control_a, drug="x+y", dose=1.0)
    shift_x, shift_y = log([9000, 1000]) - log([5000, 5000]), log([6000, 4000]) - log([5000, 5000])
    np.testing.assert_allclose(matching, log([[5000, 5000]] * 2) + (shift_x + shift_y) / 2)
    # with a pair in training, ridge has one indicator for it; an unseen pair leaves it at 0
    rows = _hand_adata()
    pair = AnnData(X=np.array([[8000, 2000]], dtype=np.float32),
                   obs=pd.DataFrame({"cell_type": ["A"], "drug": ["x+y"], "dose": [1.0]}, index=["p"]))  # fmt: skip
    ridge = RidgeCovariates().fit(anndata.concat([rows, pair]), keys=KEYS)
    assert ridge.pairs == ["x+y"]
    features = ridge._features("A", "x+y", 1.0)
    assert features[-1] == 1.0 and ridge._features("A", "x", 1.0)[-1] == 0.0


def test_oracle_moves_the_control_counts_by_the_true_fold_change():
    """Fold change 1 keeps each cell's counts; 1/2 thins them (binomial, mean halved); 3 adds
    Poisson counts of mean (3 - 1) x the true mean, so a gene at zero can rise."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(50.0, size=(400, 3)).astype(np.float32)
    counts[:, 2] = 0.0
    obs = pd.DataFrame({"cell_type": "A", "drug": "control", "dose": 0.0}, index=[f"c{i}" for i in range(400)])
    control = AnnData(X=counts, obs=obs)
    control.layers["true_mean"] = np.tile(np.float32([50.0, 50.0, 1.0]), (400, 1))
    log_fc = lambda adata, drug, dose: pd.DataFrame({"A": np.log([1.0, 0.5, 3.0])})  # noqa: E731
    normalised = np.expm1(Oracle(log_fc, seed=0).fit(control, keys=KEYS).predict(control, drug="x", dose=1.0))
    moved = normalised * (counts[:, :1] / normalised[:, :1])  # gene 0 keeps its counts: undo the normalisation
    np.testing.assert_allclose(moved[:, 0], counts[:, 0])
    assert (moved[:, 1] <= counts[:, 1] + 1e-3).all() and moved[:, 1].mean() == pytest.approx(25.0, rel=0.05)
    assert moved[:, 2].mean() == pytest.approx(2.0, rel=0.1)
    with pytest.raises(InputDataError, match="true_mean"):
        Oracle(log_fc).fit(control, keys=KEYS).predict(AnnData(X=counts, obs=control.obs), drug="x", dose=1.0)


def test_no_change_predicts_the_control_cells():
    adata = _hand_adata()
    np.testing.assert_allclose(NoChange().fit(adata, keys=KEYS).predict(adata[[4]], drug="x", dose=1.0),
                               np.log1p([[2000, 8000]]))  # fmt: skip


@pytest.mark.parametrize("seed", range(5))
def test_no_change_has_delta_r2_at_most_zero(seed):
    rng = np.random.default_rng(seed)
    control = rng.normal(size=(40, 30))
    true = rng.normal(size=(50, 30)) + rng.normal(size=30)
    metrics = perturbation_metrics(control, true, control.copy(), n_top_genes=10)
    assert metrics["r2_delta"] <= 0 and metrics["r2_delta_top_de"] <= 0
    perfect = perturbation_metrics(control, true, true.copy(), n_top_genes=10)
    assert perfect["r2_delta"] == pytest.approx(1.0) and perfect["energy"] == pytest.approx(0.0, abs=1e-9)


def test_r2_matches_sklearn_and_log_normalize_by_hand():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=20), rng.normal(size=20)
    assert r2_score(a, b) == pytest.approx(sklearn_r2(a, b))
    np.testing.assert_allclose(log_normalize(np.array([[1.0, 3.0], [0.0, 0.0]]), target_sum=4.0),
                               [[np.log(2.0), np.log(4.0)], [0.0, 0.0]])  # fmt: skip


def test_scgen_moves_the_control_counts_by_its_decoded_fold_change():
    """scGen decoded z + shift alone, so the decoder's reconstruction error of every gene was scored
    as predicted change; like genailab it now moves each control cell's counts by the decoded ratio."""
    from genailab.data.simulate import PerturbationSpec, simulate
    from genailab.perturb.baselines import LatentArithmetic

    screen = simulate(600, 60, n_cell_types=2, perturbation=PerturbationSpec(n_drugs=2), seed=0)
    scgen = LatentArithmetic(latent_dim=4, hidden_dims=(32,), train_options=dict(epochs=3, progress=False))
    scgen.fit(screen, keys=KEYS, layer="counts")
    controls = screen[(screen.obs["drug"] == "control").to_numpy()].copy()
    scgen.shifts = {key: np.zeros_like(shift) for key, shift in scgen.shifts.items()}  # no latent shift: no change
    unchanged = scgen.predict(controls, drug="drug_0", dose=1.0)
    np.testing.assert_allclose(unchanged, log_normalize(controls.layers["counts"].toarray()), rtol=1e-6)
