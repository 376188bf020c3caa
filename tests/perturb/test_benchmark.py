"""The benchmark end to end on a small simulated screen: the model against no change."""

from __future__ import annotations

import numpy as np
import pytest

from genailab.data.simulate import PerturbationSpec, simulate, true_drug_log_fc
from genailab.perturb import AdditiveShift, CounterfactualVAE, NoChange, ObsKeys, Oracle, compare_methods, holdout_split
from genailab.perturb.evaluate import log_normalize


def test_model_beats_no_change_on_an_unseen_middle_dose(perturb_adata, model_options):
    split = holdout_split(perturb_adata.obs, "dose")
    model_options.pop("layer")
    methods = [NoChange(), AdditiveShift(), CounterfactualVAE(train_options=dict(epochs=80, seed=0, progress=False),
                                                              **model_options), Oracle(true_drug_log_fc)]  # fmt: skip
    scores = compare_methods(perturb_adata, split, methods=methods)
    means = scores.groupby("method")[["r2_delta_top_de", "pearson_delta_top_de", "energy"]].mean()
    assert set(scores["protocol"]) == {"dose"} and scores["group"].nunique() == len(split.groups)
    # drug_1 reaches 81% of its top-dose effect at dose 1: measured top-50 delta R2 0.92 and 0.90 (additive
    # 0.78 and 0.81, oracle 0.94 and 0.93). drug_0 reaches 11% of it, which doses 0.1 and 10 alone cannot
    # tell from 50%: every interpolation overshoots there (additive -1.7 and -0.8, ours -3.7 and -2.0), and
    # its true change is small next to the noise of the held-out and reference means (oracle 0.19, 0.11).
    drug_1 = scores[scores["drug"] == "drug_1"].pivot(index="group", columns="method", values="r2_delta_top_de")
    assert (drug_1["genailab"] > 0.85).all() and (drug_1["genailab"] > drug_1["additive"]).all()
    assert means.loc["genailab", "pearson_delta_top_de"] > 0.6  # measured 0.66 (additive 0.68)
    assert means.loc["genailab", "energy"] < means.loc["no change", "energy"]
    # the oracle is the ceiling of every method up to noise (measured 0.54 vs additive -0.24, no change -0.05)
    assert means.loc["oracle", "r2_delta_top_de"] > means.loc["additive", "r2_delta_top_de"] + 0.5
    assert np.isfinite(scores["centroid_accuracy"]).all()


def test_unseen_middle_dose_matches_log_dose_interpolation():
    """Doses 0.1 and 10 seen, 1 held out for every drug: the fitted Hill curves must interpolate.

    Measured (seed 0, 40 epochs, changes from the benchmark's reference controls): top-50 delta R2
    0.363 vs the additive baseline's 0.221 (oracle 0.411), top-50 delta Pearson 0.59, all-gene delta
    R2 0.269 vs -0.048, energy 0.462 vs 0.509 (with one hidden layer instead of the model's two,
    the energy was 0.532 and the last assertion failed). With the half-maximal dose started at the median
    training dose (0.1 once dose 1 is out) the curves reached 91-96% of their maximum by dose 1;
    under the earlier scoring (changes from all controls, 0.469 vs 0.485 for this start) that run
    gave 0.384, 0.093 and 0.642.
    """
    spec = PerturbationSpec(n_drugs=3, doses=(0.1, 1.0, 10.0), pair_fraction=0.2, interacting_pairs=1,
                            n_target_genes=20)  # the benchmark's simulator design
    adata = simulate(1500, 200, n_cell_types=3, n_batches=1, perturbation=spec, seed=0)
    split = holdout_split(adata.obs, "dose", seed=0)
    ours = CounterfactualVAE(train_options=dict(epochs=40, seed=0, progress=False), latent_dim=10)
    methods = [AdditiveShift(), ours, Oracle(true_drug_log_fc)]
    means = compare_methods(adata, split, methods=methods).groupby("method").mean(numeric_only=True)
    model = ours.models[0]
    assert model.config.dose_scale == pytest.approx(1.0)  # sqrt(0.1 * 10): the centre of the seen doses
    assert means.loc["genailab", "r2_delta_top_de"] > means.loc["additive", "r2_delta_top_de"] - 0.06
    assert means.loc["genailab", "pearson_delta_top_de"] > 0.5
    assert means.loc["genailab", "r2_delta"] > means.loc["additive", "r2_delta"]
    assert means.loc["genailab", "energy"] < means.loc["additive", "energy"]
    # drug_0 truly reaches 40% of its top-dose effect at dose 1 (fitted 54%; 91% from the median start)
    controls = adata[(adata.obs["drug"] == "control").to_numpy()]
    basal, middle, top = (np.log(model.predict(controls, drug="drug_0", dose=x).X.mean(0)) for x in (0.0, 1.0, 10.0))
    ratio = np.abs(middle - basal).sum() / np.abs(top - basal).sum()
    assert 0.2 < ratio < 0.85


def test_seed_ensemble_averages_its_members_and_follows_the_true_change(perturb_adata, held_out_mask, controls,
                                                                        held_out, model_options):  # fmt: skip
    """``n_seeds=2``: two models trained with seeds 0 and 1, their log-normalised counterfactuals
    averaged cell by cell; the averaged change of the unseen group follows the simulator's truth."""
    options = {k: v for k, v in model_options.items() if k != "layer"}  # the fixture's dict is shared
    ensemble = CounterfactualVAE(train_options=dict(epochs=40, seed=0, progress=False), n_seeds=2, **options)
    ensemble.fit(perturb_adata[~held_out_mask].copy(), keys=ObsKeys(), layer="counts")
    cell_type, drug, dose = held_out
    predicted = ensemble.predict(controls, drug=drug, dose=dose)
    members = [log_normalize(m.predict(controls, drug=drug, dose=dose, seed=k).layers["counterfactual"])
               for k, m in enumerate(ensemble.models)]  # fmt: skip
    np.testing.assert_allclose(predicted, (members[0] + members[1]) / 2)
    first, second = (m.predict(controls, drug=drug, dose=dose).X for m in ensemble.models)
    assert not np.allclose(first, second, rtol=1e-3)  # the two seeds give two different fits
    # the true change in log-normalised expression, from the simulator's expected counts under the drug
    true_mean = np.asarray(controls.layers["true_mean"], dtype=np.float64)
    log_fc = true_drug_log_fc(controls, drug, dose)[cell_type].to_numpy()
    true_delta = log_normalize(true_mean * np.exp(log_fc)).mean(0) - log_normalize(true_mean).mean(0)
    base = log_normalize(controls.layers["counts"]).mean(0)
    targets = np.flatnonzero(np.abs(log_fc) > 0)
    changes = [m.mean(0) - base for m in (*members, predicted)]
    correlations = [np.corrcoef(c[targets], true_delta[targets])[0, 1] for c in changes]
    errors = [np.abs(c - true_delta).sum() for c in changes]
    assert min(correlations) > 0.95  # measured 0.994, 0.996 and 0.996 (the ensemble) on the 20 targets
    # the ensemble's change is the members' mean, so its L1 error is at most their mean error
    # (measured 8.8 and 11.9 for the members, 10.2 for the ensemble)
    assert errors[2] <= (errors[0] + errors[1]) / 2 + 1e-9
