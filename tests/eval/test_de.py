"""DE agreement metrics on hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest

from genailab.errors import ConfigError, InputDataError
from genailab.eval import precision_recall, top_k_overlap


@pytest.mark.parametrize(
    ("scores_a", "scores_b", "k", "expected"),
    [
        ([5.0, -4.0, 0.1, 0.2], [3.0, 0.0, -2.0, 0.1], 2, 0.5),  # top |a| = {0, 1}, top |b| = {0, 2}
        ([1.0, 2.0, 3.0, 4.0], [-4.0, -3.0, 2.0, 1.0], 2, 0.0),  # sign ignored, opposite ends
        ([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], 3, 1.0),  # same ranking, other scale
        ([1.0, 2.0, 3.0], [3.0, 1.0, 2.0], 3, 1.0),  # k = n_genes: everything shared
        ([1.0, 1.0, 0.0], [0.0, 1.0, 1.0], 1, 0.0),  # tie goes to the lower index: {0} vs {1}
    ],
)
def test_top_k_overlap(scores_a, scores_b, k, expected):
    assert top_k_overlap(scores_a, scores_b, k=k) == pytest.approx(expected)


def test_precision_recall_by_hand():
    called = np.array([True, True, True, False, False, False])
    truth = np.array([True, False, False, True, False, False])
    # 1 true positive of 3 calls, of 2 true genes: P = 1/3, R = 1/2, F1 = 2PR/(P+R) = 0.4
    assert precision_recall(called, truth) == pytest.approx({"precision": 1 / 3, "recall": 0.5, "f1": 0.4})
    assert precision_recall(truth, truth) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_precision_undefined_without_calls():
    scores = precision_recall([False, False, False], [True, False, False])
    assert np.isnan(scores["precision"]) and scores["recall"] == 0.0


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="k="):
        top_k_overlap([1.0, 2.0], [1.0, 2.0], k=3)
    with pytest.raises(InputDataError, match="align"):
        top_k_overlap([1.0, 2.0], [1.0, 2.0, 3.0], k=1)
    with pytest.raises(InputDataError, match="NaN"):
        top_k_overlap([np.nan, 2.0], [1.0, 2.0], k=1)
    with pytest.raises(InputDataError, match="align"):
        precision_recall([True], [True, False])


def test_precision_recall_takes_bools_or_zero_one_integers_only():
    assert precision_recall([1, 1, 0, 0], [1, 0, 1, 0]) == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    # p-values are not calls: bool(0.03) and bool(0.9) are both True, so this used to read as 4 calls
    with pytest.raises(InputDataError, match="padj < 0.05") as error:
        precision_recall([0.03, 0.9, 0.5, 0.01], [True, False, False, True])
    assert error.value.argument == "called"
    with pytest.raises(InputDataError, match="True/False"):  # bool('False') is True
        precision_recall([True, False], np.array(["False", "True"]))
    with pytest.raises(InputDataError, match="truth"):
        precision_recall([True, False], [2, 0])
