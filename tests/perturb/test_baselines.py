"""Baselines and metrics on hand-made examples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from sklearn.metrics import r2_score as sklearn_r2

from genailab.errors import SchemaMismatchError
from genailab.perturb import AdditiveShift, NoChange, ObsKeys, log_normalize, perturbation_metrics, r2_score

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
    control_a = adata[[0, 1]]
    # shift of x at dose 1: mean over types A and B of (treated mean - control mean), in log1p(counts)
    shift_x = ((np.log1p([9000, 1000]) - np.log1p([5000, 5000])) + (np.log1p([4000, 6000]) - np.log1p([2000, 8000]))) / 2
    shift_y = np.log1p([6000, 4000]) - np.log1p([5000, 5000])  # only seen in type A
    np.testing.assert_allclose(baseline.predict(control_a, drug="x", dose=1.0), np.log1p([[5000, 5000]] * 2) + shift_x)
    # a combination adds the shifts; an unseen dose reads the nearest seen dose (3 is nearer 1 than 10 in log)
    np.testing.assert_allclose(
        baseline.predict(control_a, drug="x+y", dose=3.0), np.log1p([[5000, 5000]] * 2) + shift_x + shift_y
    )
    shift_x10 = np.log1p([7000, 3000]) - np.log1p([2000, 8000])
    np.testing.assert_allclose(baseline.predict(control_a, drug="x", dose=8.0), np.log1p([[5000, 5000]] * 2) + shift_x10)
    with pytest.raises(SchemaMismatchError, match="never seen"):
        baseline.predict(control_a, drug="z", dose=1.0)


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
