"""Application inputs that used to crash late, be ignored, or be silently misread: each now gets a
clear error before any work, or the documented behaviour (a red-team round of the applications)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from genailab import VAE, TrainConfig
from genailab.apps import cluster, differential_expression, generate, generated_vs_real, integration_scores
from genailab.cli import main
from genailab.errors import ConfigError, InputDataError


@pytest.fixture(scope="module")
def nb_model(app_data):
    model = VAE(app_data, likelihood="nb", layer="counts", latent_dim=4, hidden_dims=(32,))
    return model.fit(TrainConfig(epochs=3, seed=0, progress=False))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, app_data, app_model):
    folder = tmp_path_factory.mktemp("app_errors")
    app_data.write_h5ad(folder / "data.h5ad")
    app_model.save(folder / "run")
    return folder


def test_integrate_checks_labels_key_before_training(saved, tmp_path):
    out = tmp_path / "int"
    result = CliRunner().invoke(main, ["integrate", str(saved / "data.h5ad"), "--batch-key", "batch", "--layer",
                                       "counts", "--labels-key", "cell_typo", "--epochs", "1", "--out", str(out)])  # fmt: skip
    assert result.exit_code != 0 and "--labels-key" in result.output and "'cell_typo'" in result.output
    assert "Traceback" not in result.output and not (out / "model.pt").exists()


def test_integrate_offers_no_checkpoints_it_cannot_write():
    result = CliRunner().invoke(main, ["integrate", "--help"])
    assert result.exit_code == 0 and "--checkpoint-every" not in result.output and "--epochs" in result.output


def test_integration_scores_name_the_missing_argument(app_data):
    adata = app_data.copy()
    adata.obsm["X_genailab_integrated"] = np.zeros((adata.n_obs, 2))
    for kwargs, argument in ((dict(batch_key="btypo"), "batch_key"), (dict(batch_key="batch", label_key="typo"),
                             "label_key"), (dict(batch_key="batch", key="X_nope"), "key")):  # fmt: skip
        with pytest.raises(InputDataError, match=argument) as info:
            integration_scores(adata, **kwargs)
        assert info.value.argument == argument


def test_a_condition_given_twice_is_refused(saved, tmp_path):
    result = CliRunner().invoke(main, ["generate", str(saved / "run"), "--n-cells", "5", "--condition",
                                       "cell_type=type_0", "--condition", "cell_type=type_1", "--condition",
                                       "batch=batch_0", "--out", str(tmp_path / "g.h5ad")])  # fmt: skip
    assert result.exit_code != 0 and "cell_type twice" in result.output and not (tmp_path / "g.h5ad").exists()


def test_generate_never_draws_an_empty_cells_library(app_data, app_model):
    adata = app_data.copy()
    empty = np.flatnonzero(adata.obs["cell_type"] == "type_0")[:1]
    counts = adata.layers["counts"].tolil()
    counts[empty, :] = 0
    adata.layers["counts"] = counts.tocsr()
    adata.obs["pick"] = "no"
    adata.obs.iloc[empty, adata.obs.columns.get_loc("pick")] = "yes"
    adata.obs.iloc[empty + 1, adata.obs.columns.get_loc("pick")] = "yes"  # one more cell, with counts
    cells = generate(adata, app_model, n_cells=6, conditions={"pick": "yes"}, source="posterior", seed=0)
    assert set(cells.obs["source_cell"]) == {adata.obs_names[empty[0] + 1]}
    with pytest.raises(InputDataError, match="no counts over the model's genes"):
        generate(adata[empty].copy(), app_model, n_cells=3, source="prior", seed=0)


def test_cluster_refuses_keys_that_overwrite_each_other_or_scanpys(app_data, app_model):
    for kwargs in (dict(markers_key="leiden"), dict(key_added="neighbors"), dict(markers_key="umap")):
        adata = app_data.copy()
        with pytest.raises(ConfigError, match="names two results in adata.uns"):
            cluster(adata, app_model, **kwargs)
        assert "X_genailab" not in adata.obsm  # refused before any work


def test_de_leaves_unlabelled_cells_out_of_the_rest(app_data, app_model):
    adata = app_data.copy()
    labels = adata.obs["cell_type"].astype(object)
    labels.iloc[:100] = np.nan
    adata.obs["partial"] = labels
    table = differential_expression(adata, app_model, groupby="partial", group="type_1", level="group", seed=0)
    labelled_rest = int(((labels != "type_1") & labels.notna()).sum())
    assert adata.uns["genailab_de"]["params"]["n_reference"] == labelled_rest < int((labels != "type_1").sum())
    with pytest.raises(InputDataError, match="'nan' has no cells"):
        differential_expression(adata, app_model, groupby="partial", group="nan", level="group")
    assert len(table) == adata.n_vars


def test_include_dropout_is_refused_by_a_model_without_dropout(app_data, nb_model, app_model):
    with pytest.raises(ConfigError, match="include_dropout=True needs a zinb model"):
        nb_model.get_normalized_expression(app_data, include_dropout=True)
    with pytest.raises(ConfigError, match="include_dropout=True needs a zinb model"):
        nb_model.decode(np.zeros((2, 4)), include_dropout=True)
    with_dropout = app_model.get_normalized_expression(app_data[:20], include_dropout=True, library_size=1e4)
    without = app_model.get_normalized_expression(app_data[:20], library_size=1e4)
    assert (with_dropout < without).all()  # (1 - pi) * mu


def test_generated_vs_real_takes_fewer_folds_for_a_rare_type(app_data):
    counts = app_data.layers["counts"]
    with pytest.raises(Exception, match="n_folds"):
        generated_vs_real(counts[:3], counts[3:40])
    scores = generated_vs_real(counts[:3], counts[3:40], n_folds=2, seed=0)
    assert 0.0 <= scores["classifier_auc"] <= 1.0


def test_commands_say_which_genes_they_leave_out(saved, app_data, tmp_path):
    import scipy.sparse as sp

    extra_genes = ad.AnnData(sp.csr_matrix(np.ones((app_data.n_obs, 2), dtype=np.float32)), obs=app_data.obs[[]])
    extra_genes.var_names = ["extra_1", "extra_2"]
    extra_genes.layers["counts"] = extra_genes.X.copy()
    wider = ad.concat([app_data[:, :], extra_genes], axis=1, join="inner")
    wider.obs = app_data.obs.copy()
    wider.write_h5ad(tmp_path / "wider.h5ad")
    result = CliRunner().invoke(main, ["denoise", str(saved / "run"), str(tmp_path / "wider.h5ad"), "--out",
                                       str(tmp_path / "den.h5ad")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"2 of {tmp_path / 'wider.h5ad'}'s {app_data.n_vars + 2} genes are not the model's" in result.output
    assert ad.read_h5ad(tmp_path / "den.h5ad").n_vars == app_data.n_vars


@pytest.mark.parametrize(("command", "key"), [("embed", ""), ("embed", "a/b"), ("denoise", "x/y"), ("denoise", " ")])
def test_an_output_key_an_h5ad_cannot_store_is_refused_before_the_work(saved, tmp_path, command, key):
    """'' and '/' made an h5ad that anndata could not read back, with exit status 0."""
    out = tmp_path / "out.h5ad"
    result = CliRunner().invoke(main, [command, str(saved / "run"), str(saved / "data.h5ad"), "--out", str(out),
                                       "--key", key])  # fmt: skip
    assert result.exit_code == 2 and "--key" in result.output and "Traceback" not in result.output, result.output
    assert not out.exists()


def test_python_key_added_an_h5ad_cannot_store_is_refused(app_data, nb_model):
    from genailab.apps import integrate, transfer_labels

    calls = {
        "differential_expression": lambda: differential_expression(app_data.copy(), nb_model, groupby="cell_type",
                                                                   group="type_0", key_added="de/b"),
        "integrate": lambda: integrate(app_data.copy(), batch_key="batch", layer="counts", key_added="X/int"),
        "integrate corrected_layer": lambda: integrate(app_data.copy(), batch_key="batch", layer="counts",
                                                       corrected_layer="a/b"),
        "transfer_labels": lambda: transfer_labels(app_data.copy(), app_data, label_key="cell_type", key_added="t/l"),
    }  # fmt: skip
    for name, call in calls.items():
        with pytest.raises(ConfigError, match="contains '/'") as info:
            call()
        assert info.value.argument == ("corrected_layer" if "corrected" in name else "key_added"), name


def test_integrate_checks_the_labels_can_be_scored_before_training(app_data, tmp_path):
    """Labels each confined to one batch failed in the scores, after the model was trained and saved."""
    adata = app_data.copy()
    adata.obs["per_batch"] = adata.obs["batch"].astype(str) + "_type"
    adata.write_h5ad(tmp_path / "data.h5ad")
    out = tmp_path / "int"
    result = CliRunner().invoke(main, ["integrate", str(tmp_path / "data.h5ad"), "--batch-key", "batch", "--layer",
                                       "counts", "--labels-key", "per_batch", "--epochs", "1", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 1 and "No label of obs['per_batch'] has cells from two or more batches" in result.output
    assert "check that --labels-key holds the cell types and --batch-key the batches" in result.output, result.output
    assert not out.exists()


def test_integration_scores_leave_cells_without_a_batch_out(app_data, caplog):
    """A NaN batch was scored as a batch called 'nan' (iLISI 0.763 against 0.783 on the cells with one)."""
    import logging

    from genailab import eval as ge

    adata = app_data.copy()
    adata.obsm["Z"] = np.random.default_rng(0).normal(size=(adata.n_obs, 3))
    batch = adata.obs["batch"].astype(object)
    batch.iloc[::3] = np.nan
    adata.obs["partial"] = batch
    with caplog.at_level(logging.WARNING, logger="genailab.apps._anndata"):
        scores = integration_scores(adata, batch_key="partial", label_key="cell_type", key="Z")
    known = adata.obs["partial"].notna().to_numpy()
    z, b, labels = adata.obsm["Z"], adata.obs["partial"].astype(str).to_numpy(), adata.obs["cell_type"].to_numpy()
    assert scores["ilisi"] == pytest.approx(ge.ilisi(z[known], b[known], perplexity=min(30, int(known.sum()) // 3)))
    assert scores["batch_silhouette"] == pytest.approx(ge.batch_silhouette(z[known], b[known], labels[known]))
    assert scores["label_silhouette"] == pytest.approx(ge.label_silhouette(z, labels))  # every labelled cell
    assert f"{int((~known).sum())} of {adata.n_obs} cells have no 'partial' (NaN)" in caplog.text


def test_integration_scores_on_few_cells_name_no_internal_option(app_data):
    adata = app_data[:15].copy()
    adata.obsm["Z"] = np.random.default_rng(0).normal(size=(15, 2))
    scores = integration_scores(adata, batch_key="batch", label_key="cell_type", key="Z")
    assert 0 <= scores["graph_connectivity"] <= 1


def test_de_groups_and_the_reference_batch_read_numbers_as_the_model_does(app_data, nb_model):
    """group=1 found no cells in a float column ('1.0'), nor reference_batch=1 in integrate."""
    from genailab.apps import integrate

    adata = app_data.copy()
    adata.obs["f"] = adata.obs["cell_type"].cat.codes.astype(float)  # 0.0, 1.0, 2.0
    by_float = differential_expression(adata.copy(), nb_model, groupby="f", group=1, reference=2.0, seed=0)
    adata.obs["i"] = adata.obs["cell_type"].cat.codes.astype(int)
    by_int = differential_expression(adata.copy(), nb_model, groupby="i", group="1", reference=2, seed=0)
    pd.testing.assert_frame_equal(by_float, by_int)
    adata.obs["fb"] = (adata.obs["batch"] == "batch_1").astype(float)
    integrate(adata, batch_key="fb", layer="counts", reference_batch=1, latent_dim=2, hidden_dims=(8,),
              train=TrainConfig(epochs=1, progress=False))  # fmt: skip
    assert adata.uns["X_genailab_integrated"]["params"]["reference_batch"] == 1
