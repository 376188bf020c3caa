"""Generated cells against real cells of the same and of another cell type."""

from __future__ import annotations

import numpy as np
import pytest

from genailab import VAE, TrainConfig
from genailab.apps import generate, generated_vs_real
from genailab.errors import ConfigError, InputDataError


def _cells(adata, cell_type):
    return adata[adata.obs["cell_type"] == cell_type].layers["counts"]


@pytest.mark.parametrize("source", ["prior", "posterior"])
def test_generated_cells_resemble_their_cell_type(app_data, app_model, source):
    generated = generate(app_data, app_model, n_cells=150, conditions={"cell_type": "type_0"}, source=source, seed=1)
    same = generated_vs_real(_cells(app_data, "type_0"), generated.X)
    other = generated_vs_real(_cells(app_data, "type_1"), generated.X)
    assert same["mean_pearson"] > 0.85 and same["zero_fraction_mae"] < 0.1
    assert same["energy_distance"] < 0.5 * other["energy_distance"]
    assert same["classifier_auc"] < other["classifier_auc"]
    assert (generated.obs["cell_type"] == "type_0").all()
    assert set(generated.obs["source_cell"]) <= set(app_data.obs_names[app_data.obs["cell_type"] == "type_0"])


def test_library_sizes_follow_the_real_cells_or_the_given_total(app_data, app_model):
    resampled = generate(app_data, app_model, n_cells=300, conditions={"cell_type": "type_2"}, seed=0)
    real_totals = np.asarray(_cells(app_data, "type_2").sum(axis=1)).ravel()
    generated_totals = np.asarray(resampled.X.sum(axis=1)).ravel()
    assert abs(np.median(generated_totals) / np.median(real_totals) - 1) < 0.15
    fixed = generate(None, app_model, n_cells=300, conditions={"cell_type": "type_2", "batch": "batch_0"},
                     library_size=5000, seed=0)  # fmt: skip
    assert abs(fixed.X.sum(axis=1).mean() / 5000 - 1) < 0.15  # ZINB: a little below, from dropout
    assert "source_cell" not in fixed.obs and fixed.uns["genailab_generate"]["params"]["library_size"] == 5000


def test_seed_fixes_the_draws(app_data, app_model):
    first, second = (generate(app_data, app_model, n_cells=20, source="posterior", seed=3) for _ in range(2))
    assert (first.X != second.X).nnz == 0
    third = generate(app_data, app_model, n_cells=20, source="posterior", seed=4)
    assert (first.X != third.X).nnz > 0


def test_posterior_follows_an_obs_column_the_model_was_not_given(app_data):
    model = VAE(app_data, likelihood="zinb", layer="counts", condition_keys=["batch"], latent_dim=6, hidden_dims=(64,))
    model.fit(TrainConfig(epochs=20, seed=0, progress=False))
    generated = generate(app_data, model, n_cells=100, conditions={"cell_type": "type_2"}, source="posterior")
    assert (generated.obs["cell_type"] == "type_2").all()
    same = generated_vs_real(_cells(app_data, "type_2"), generated.X)
    other = generated_vs_real(_cells(app_data, "type_0"), generated.X)
    assert same["energy_distance"] < 0.5 * other["energy_distance"]
    with pytest.raises(ConfigError, match="source='posterior'"):
        generate(app_data, model, n_cells=10, conditions={"cell_type": "type_2"})


def test_bad_requests(app_data, app_model):
    with pytest.raises(ConfigError, match="posterior"):
        generate(None, app_model, n_cells=5, source="posterior")
    with pytest.raises(ConfigError, match="batch"):
        generate(None, app_model, n_cells=5, conditions={"cell_type": "type_0"})
    with pytest.raises(InputDataError, match="No cell"):
        generate(app_data, app_model, n_cells=5, conditions={"cell_type": "type_9"})


def test_posterior_cells_come_from_a_numeric_coded_group(app_data, app_model):
    """An integer-coded column was skipped as if continuous: cells came from every group, labelled as the one asked for."""
    adata = app_data.copy()
    adata.obs["cluster"] = adata.obs["cell_type"].cat.codes.astype(int)
    generated = generate(adata, app_model, n_cells=60, conditions={"cluster": 2}, source="posterior", seed=0)
    assert set(adata.obs.loc[generated.obs["source_cell"], "cluster"]) == {2}


def test_generated_vs_real_matches_genes_by_name_and_reads_counts(app_data, app_model):
    """A real AnnData with its genes in another order was compared column by column (mean Pearson
    0.18 against 0.003 in the same order), and log-normalised X was taken for counts."""
    import scanpy as sc

    generated = generate(app_data, app_model, n_cells=100, seed=0)
    real = app_data.copy()
    real.X = real.layers["counts"].copy()
    scores = generated_vs_real(real, generated, n_comps=5, n_folds=2)
    reordered = generated_vs_real(real[:, real.var_names[::-1]].copy(), generated, n_comps=5, n_folds=2)
    assert reordered == pytest.approx(scores)
    with pytest.raises(InputDataError, match="name different genes"):
        generated_vs_real(real[:, 1:].copy(), generated[:, :-1].copy())
    sc.pp.normalize_total(real)
    sc.pp.log1p(real)
    with pytest.raises(InputDataError, match="real is not raw counts .* pass layer='counts'"):
        generated_vs_real(real, generated)
    assert generated_vs_real(real, generated, layer="counts", n_comps=5, n_folds=2) == pytest.approx(scores)  # same X
    with pytest.raises(ConfigError, match="n_folds must be a whole number >= 2, got 1"):
        generated_vs_real(real, generated, layer="counts", n_folds=1)
    with pytest.raises(InputDataError, match="real has 1 gene.s.; .* need at least 2 genes"):
        generated_vs_real(real[:, :1].copy(), generated[:, real.var_names[:1]].copy(), layer="counts")
