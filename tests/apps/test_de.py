"""Model-based differential expression against the simulator's true fold changes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from genailab.apps import differential_expression
from genailab.errors import ConfigError, InputDataError
from genailab.eval import precision_recall


def true_log2_fc(adata, group: str, reference: str) -> pd.Series:
    """Mean log2 true proportion of the group's cells minus that of the reference's cells."""
    truth = np.asarray(adata.layers["true_mean"], dtype=np.float64)
    log_p = np.log2(truth / truth.sum(axis=1, keepdims=True))
    labels = adata.obs["cell_type"].to_numpy()
    return pd.Series(log_p[labels == group].mean(0) - log_p[labels == reference].mean(0), index=adata.var_names)


def test_calls_match_the_true_differential_genes(app_data, app_model):
    adata = app_data.copy()
    table = differential_expression(
        adata, app_model, groupby="cell_type", group="type_0", reference="type_1", delta=1.0
    )
    truth = true_log2_fc(adata, "type_0", "type_1").reindex(table.index)
    assert np.corrcoef(table["lfc_mean"], truth)[0, 1] > 0.9
    # calls are true changes beyond delta; the model shrinks fold changes and P(|LFC| > delta) is over
    # pairs of single cells, so genes just past delta are missed, but most beyond 2 * delta are called
    assert precision_recall(table["is_de_fdr"], truth.abs() > 1.0)["precision"] > 0.9
    assert precision_recall(table["is_de_fdr"], truth.abs() > 2.0)["recall"] > 0.7
    assert adata.uns["genailab_de"]["params"]["n_group"] == int((adata.obs["cell_type"] == "type_0").sum())
    pd.testing.assert_frame_equal(adata.uns["genailab_de"]["results"], table)


def test_group_level_calls_more_of_the_true_genes(app_data, app_model):
    table = differential_expression(app_data.copy(), app_model, groupby="cell_type", group="type_0",
                                    reference="type_1", delta=1.0, level="group")  # fmt: skip
    truth = true_log2_fc(app_data, "type_0", "type_1").reindex(table.index)
    assert precision_recall(table["is_de_fdr"], truth.abs() > 1.0)["precision"] > 0.9
    assert precision_recall(table["is_de_fdr"], truth.abs() > 2.0)["recall"] > 0.9


def test_fdr_list_is_the_top_of_the_ranking(app_data, app_model):
    table = differential_expression(app_data.copy(), app_model, groupby="cell_type", group="type_2", delta=0.5)
    called = table["is_de_fdr"].to_numpy()
    assert called.any() and not called.all()
    assert not called[np.argmin(called) :].any()  # calls form a prefix of the list sorted by proba_de
    assert table["expected_fdr"][called].max() <= 0.05
    np.testing.assert_allclose(table["expected_fdr"], np.cumsum(1 - table["proba_de"]) / np.arange(1, len(table) + 1))
    stricter = differential_expression(app_data.copy(), app_model, groupby="cell_type", group="type_2", delta=0.5,
                                       fdr_target=0.001)  # fmt: skip
    assert stricter["is_de_fdr"].sum() <= called.sum()


def test_missing_group(app_data, app_model):
    with pytest.raises(InputDataError, match="type_7"):
        differential_expression(app_data.copy(), app_model, groupby="cell_type", group="type_7")


def test_a_group_called_rest_is_not_taken_for_every_other_cell(app_data, app_model):
    adata = app_data.copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).replace("type_2", "rest")
    with pytest.raises(ConfigError, match="has a group called 'rest'"):
        differential_expression(adata, app_model, groupby="cell_type", group="type_0")
