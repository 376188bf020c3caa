"""The benchmark end to end on a small simulated screen: the model against no change."""

from __future__ import annotations

import numpy as np
import pytest

from genailab.data.simulate import PerturbationSpec, simulate, true_drug_log_fc
from genailab.perturb import AdditiveShift, CounterfactualVAE, NoChange, Oracle, compare_methods, holdout_split


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
