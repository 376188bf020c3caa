"""Clusters of the latent against the simulated cell types, marker genes against the true markers."""

from __future__ import annotations

import pandas as pd
import pytest
import scanpy as sc
from sklearn.metrics import adjusted_rand_score

from genailab.apps import cluster
from genailab.errors import InputDataError


@pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")  # inside scanpy's plotting
def test_clusters_and_markers_recover_the_cell_types(app_data, app_model, tmp_path):
    adata = app_data.copy()
    cluster(adata, app_model, resolution=0.3, plot=tmp_path / "umap.png", color=["cell_type", "batch"])
    assert adjusted_rand_score(adata.obs["cell_type"], adata.obs["leiden"]) > 0.8
    assert adata.obsm["X_genailab"].shape == (600, 6) and adata.obsm["X_umap"].shape == (600, 2)
    assert adata.uns["leiden"]["params"]["resolution"] == 0.3
    assert (tmp_path / "umap.png").stat().st_size > 10_000
    # the top 10 markers of the cluster matching each type are mostly that type's simulated markers
    table = pd.crosstab(adata.obs["leiden"], adata.obs["cell_type"])
    for cell_type in table.columns:
        best = str(table[cell_type].idxmax())
        top = sc.get.rank_genes_groups_df(adata, group=best)["names"][:10]
        true_markers = set(adata.var_names[adata.var["marker_of"] == cell_type])
        assert len(true_markers & set(top)) >= 6, (cell_type, list(top))


def test_unknown_colour_column(app_data, app_model):
    with pytest.raises(InputDataError, match="color"):
        cluster(app_data.copy(), app_model, color=["nope"])


def test_marker_params_say_what_was_ranked(app_data, app_model):
    """The ranking's params name the layer of log-normalised counts it used, and that layer holds them."""
    import numpy as np

    from genailab.apps.cluster import MARKER_LAYER
    from genailab.data.preprocess import log_normalize

    adata = app_data.copy()
    cluster(adata, app_model, resolution=0.3)
    params = adata.uns["rank_genes_groups"]["params"]
    assert params["layer"] == MARKER_LAYER and params["use_raw"] is False
    expected = log_normalize(adata.layers["counts"]).toarray()
    np.testing.assert_allclose(adata.layers[MARKER_LAYER].toarray(), expected, rtol=1e-6)


def test_clusters_never_replace_the_labels_they_are_scored_against(app_data, app_model, tmp_path):
    from genailab.errors import ConfigError

    adata = app_data.copy()
    adata.obs["leiden"] = adata.obs["batch"].astype(str)  # e.g. annotations from an earlier run
    with pytest.raises(ConfigError, match="also key_added"):
        cluster(adata, app_model, labels_key="leiden")  # scored against themselves, ARI 1 (it was)
    with pytest.raises(ConfigError, match="a condition the model reads"):
        cluster(adata, app_model, key_added="cell_type")
    assert list(adata.obs["leiden"]) == list(app_data.obs["batch"].astype(str)) and "X_genailab" not in adata.obsm


def test_a_backed_anndata_is_refused_before_anything_is_written(app_data, app_model, tmp_path):
    import anndata as ad

    from genailab.apps import generate

    path = tmp_path / "cells.h5ad"
    app_data.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    for call in (lambda: cluster(backed, app_model), lambda: generate(backed, app_model, n_cells=5)):
        with pytest.raises(InputDataError, match="needs the data in memory"):
            call()
    assert list(backed.obsm) == ["X_true_latent"] and "leiden" not in backed.obs
    backed.file.close()


def test_one_colour_may_be_given_as_a_string(app_data, app_model, tmp_path):
    adata = app_data.copy()
    cluster(adata, app_model, color="cell_type", plot=tmp_path / "umap.png")
    assert (tmp_path / "umap.png").stat().st_size > 0


def test_cells_without_a_label_are_left_out_of_the_agreement(app_data, app_model):
    """NaN labels became a label called "nan" in the ARI and NMI."""
    adata = app_data.copy()
    labels = adata.obs["cell_type"].astype(object)
    labels[::2] = None
    adata.obs["partial"] = labels
    cluster(adata, app_model, labels_key="partial", seed=0)
    known = adata.obs["partial"].notna().to_numpy()
    expected = adjusted_rand_score(adata.obs["partial"][known].astype(str), adata.obs["leiden"][known])
    assert adata.uns["leiden"]["scores"]["ari"] == pytest.approx(expected)


@pytest.mark.parametrize(("resolution", "fix"), [(1e6, "lower `resolution`"), (1e-4, "raise `resolution`")])
def test_too_many_or_too_few_clusters_say_which_way_to_move_the_resolution(app_data, app_model, resolution, fix):
    """Singleton clusters were told to raise the resolution, in a message listing every cluster."""
    with pytest.raises(InputDataError, match=fix) as info:
        cluster(app_data.copy(), app_model, resolution=resolution)
    assert len(str(info.value)) < 300 and info.value.argument == "resolution"


def test_a_plot_path_matplotlib_cannot_write_is_refused_before_the_work(app_data, app_model, tmp_path):
    """plot='x.txt' raised matplotlib's ValueError after the clustering had written into adata."""
    from genailab.errors import ConfigError

    adata = app_data.copy()
    with pytest.raises(ConfigError, match=r"plot='.*x.txt' must end in a figure format, e.g. .png"):
        cluster(adata, app_model, plot=tmp_path / "x.txt")
    assert "leiden" not in adata.obs and "X_genailab" not in adata.obsm
