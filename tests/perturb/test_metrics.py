"""Perturbation metrics and the benchmark's contrast, against hand computations and scipy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from genailab.perturb import contrast, perturbation_metrics, r2_score
from genailab.perturb.evaluate import centroid_accuracy, pearson, top_de_genes


def test_metrics_by_hand_on_three_genes():
    control = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    true = np.array([[2.0, 1.0, 1.0], [2.0, 1.0, 1.0]])  # true change (+2, 0, -1)
    predicted = np.array([[1.0, 1.5, 1.0], [1.0, 1.5, 1.0]])  # predicted change (+1, +0.5, -1)
    perturbed = np.array([1.0, 1.0, 1.0])
    m = perturbation_metrics(control, true, predicted, perturbed_mean=perturbed, n_top_genes=2)
    t, p = np.array([2.0, 0.0, -1.0]), np.array([1.0, 0.5, -1.0])
    assert m["r2_delta"] == pytest.approx(1 - (1 + 0.25 + 0) / np.sum((t - t.mean()) ** 2))
    assert m["pearson_delta"] == pytest.approx(stats.pearsonr(t, p)[0])
    # top-2 DE genes are genes 0 (|2|) and 2 (|1|)
    assert m["r2_delta_top_de"] == pytest.approx(1 - 1 / 4.5)
    assert m["pearson_delta_top_de"] == pytest.approx(1.0)
    w = np.abs(t)
    mean_w = np.sum(w * t) / w.sum()
    assert m["r2_delta_weighted"] == pytest.approx(1 - np.sum(w * (t - p) ** 2) / np.sum(w * (t - mean_w) ** 2))
    assert m["direction_top_de"] == 1.0
    # centred on the perturbed mean: true (1, 0, 0), predicted (0, 0.5, 0)
    assert m["pearson_centred"] == pytest.approx(stats.pearsonr([1, 0, 0], [0, 0.5, 0])[0])
    assert m["r2_mean"] == pytest.approx(r2_score(true[0], predicted[0]))


def test_direction_counts_a_zero_prediction_as_wrong_and_pearson_of_constant_is_nan():
    control = np.zeros((3, 4))
    true = np.tile([1.0, -1.0, 0.5, 0.0], (3, 1))
    m = perturbation_metrics(control, true, control.copy(), n_top_genes=3)
    assert m["direction_top_de"] == 0.0 and np.isnan(m["pearson_delta"])
    assert np.isnan(pearson(np.ones(3), np.arange(3.0)))
    np.testing.assert_array_equal(top_de_genes(np.zeros(4), np.array([1.0, -3.0, 0.5, 3.0]), 2), [1, 3])


def test_centroid_accuracy_by_hand():
    true = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    predicted = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 9.0]])  # group 1 lands nearest group 0
    np.testing.assert_array_equal(centroid_accuracy(predicted, true), [1.0, 0.0, 1.0])
    assert np.isnan(centroid_accuracy(predicted[:1], true[:1])).all()


def test_contrast_picks_the_best_baseline_and_brackets_the_paired_difference():
    rows = []
    for group in range(6):
        for method, value in (("additive", 0.5 + 0.01 * group), ("ridge", 0.2), ("genailab", 0.6 + 0.01 * group),
                              ("oracle", 0.9)):  # fmt: skip
            rows.append(dict(protocol="dose", group=group, method=method, r2_delta=value, pearson_delta=value,
                             r2_delta_top_de=value, pearson_delta_top_de=value, energy=1 - value))  # fmt: skip
    table = contrast(pd.DataFrame(rows))
    r2 = table[table["metric"] == "r2_delta"].iloc[0]
    assert r2["best_baseline"] == "additive"  # the oracle is no baseline
    assert r2["ours"] - r2["best"] == pytest.approx(0.1)
    assert r2["low"] == pytest.approx(0.1) and r2["high"] == pytest.approx(0.1)  # the same difference in every group
    energy = table[table["metric"] == "energy"].iloc[0]
    assert energy["best_baseline"] == "additive" and energy["ours"] - energy["best"] == pytest.approx(-0.1)
