"""scIB integration metrics: hand-computed cases, and agreement with harmonypy and scib-metrics when installed."""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chi2, entropy

from genailab.errors import ConfigError, InputDataError
from genailab.eval import clisi, graph_connectivity, ilisi, kbet, knn_batch_inverse_simpson, lisi
from genailab.eval.integration import PERPLEXITY_TOLERANCE, _perplexity_weights


def _tight_clusters(sizes: list[int], *, seed: int = 0, dims: int = 3) -> np.ndarray:
    """Clusters of the given sizes, 1000 apart, each cell within 0.01 of its centre, (sum(sizes), dims)."""
    rng = np.random.default_rng(seed)
    centres = np.repeat(1000.0 * np.arange(len(sizes)), sizes)
    return centres[:, None] + 0.01 * rng.random((sum(sizes), dims))


@pytest.fixture(scope="module")
def reference_data():
    """600 cells in 8-D: three batches (batch 1 shifted along one axis), four cell types along another."""
    rng = np.random.default_rng(0)
    n = 600
    latent = rng.normal(size=(n, 8))
    batch = rng.integers(0, 3, n).astype(str)
    labels = rng.integers(0, 4, n).astype(str)
    latent[:, 0] += 1.5 * (batch == "1")
    latent[:, 1] += 2.0 * labels.astype(int)
    return latent, batch, labels


def test_equal_distances_give_equal_weights():
    """Four corners of a regular simplex: the 3 other cells are equidistant, so each weighs 1/3 at any
    bandwidth. Batches x, x, y, y: every cell sees 1 x and 2 y (or the reverse), inverse Simpson
    1 / (1/9 + 4/9) = 1.8, iLISI (1.8 - 1) / (2 - 1) = 0.8."""
    latent, batch = np.eye(4), np.array(["x", "x", "y", "y"])
    np.testing.assert_allclose(lisi(latent, batch, perplexity=2, n_neighbors=4), 1.8)
    assert ilisi(latent, batch, perplexity=2, n_neighbors=4) == pytest.approx(0.8)


def test_gaussian_weights_by_hand():
    """Cells at 0, 1 and 3 on a line, two other neighbours each. At the perplexity of weights (0.8, 0.2),
    each cell gives 0.8 to its nearer and 0.2 to its farther neighbour. Batches x, x, y: cells 0 and 1
    put 0.8 on x and 0.2 on y (inverse Simpson 1 / 0.68); cell 2 sees two x (1)."""
    latent, batch = np.array([[0.0], [1.0], [3.0]]), np.array(["x", "x", "y"])
    perplexity = np.exp(entropy([0.8, 0.2]))
    per_cell = lisi(latent, batch, perplexity=perplexity, n_neighbors=3)
    np.testing.assert_allclose(per_cell, [1 / 0.68, 1 / 0.68, 1.0], rtol=1e-4)
    assert ilisi(latent, batch, perplexity=perplexity, n_neighbors=3) == pytest.approx(1 / 0.68 - 1, rel=1e-4)
    # cell types a, b, b: cell 0 sees only b (1); cells 1 and 2 put 0.8 and 0.2 on a and b (1 / 0.68);
    # cLISI scales the median as (2 - median) / (2 - 1)
    labels = np.array(["a", "b", "b"])
    assert clisi(latent, labels, perplexity=perplexity, n_neighbors=3) == pytest.approx(2 - 1 / 0.68, rel=1e-4)


def test_bandwidth_search_reaches_the_perplexity():
    rng = np.random.default_rng(3)
    distances = np.sort(rng.gamma(2.0, 3.0, size=(200, 89)), axis=1)
    distances[:5] *= 1e4  # far-apart cells: the kernel must not underflow
    weights = _perplexity_weights(distances, 30)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    np.testing.assert_allclose(entropy(weights, axis=1), np.log(30), atol=PERPLEXITY_TOLERANCE)


def test_separated_batches_score_zero_and_mixed_near_one():
    rng = np.random.default_rng(1)
    latent = rng.normal(size=(400, 5))
    batch = np.tile(["x", "y"], 200)
    assert ilisi(latent, batch) > 0.9  # same distribution, random batch: only sampling noise below 1
    assert kbet(latent, batch) > 0.9
    split = latent + 100.0 * (batch == "y")[:, None]
    assert ilisi(split, batch) == pytest.approx(0.0, abs=1e-12)
    assert kbet(split, batch) == 0.0


def test_clisi_separated_types_score_one_and_random_types_near_zero():
    latent = _tight_clusters([100, 100, 100])
    types = np.repeat(["a", "b", "c"], 100)
    assert clisi(latent, types) == pytest.approx(1.0)
    shuffled = np.random.default_rng(2).permutation(types)
    assert clisi(np.random.default_rng(2).normal(size=(300, 4)), shuffled) < 0.15


def test_kbet_by_hand():
    """Three clusters of 8 cells (the neighbourhood size): 8 x; 4 x and 4 y; 8 y. Expected counts
    (4, 4): the pure clusters give chi-square 16/4 + 16/4 = 8 (p = 0.0047, rejected), the mixed one 0
    (accepted), so 8 of 24 cells are accepted."""
    latent = _tight_clusters([8, 8, 8])
    batch = np.array(["x"] * 12 + ["y"] * 12)
    assert chi2.sf(8.0, df=1) < 0.05
    assert kbet(latent, batch, n_neighbors=8) == pytest.approx(1 / 3)
    # below the pure clusters' p-value every neighbourhood is accepted
    assert kbet(latent, batch, n_neighbors=8, alpha=0.001) == pytest.approx(1.0)


def test_graph_connectivity_by_hand():
    """Clusters of 4 cells, neighbourhoods of 4: every cell links to exactly its cluster mates. Type a
    spans two clusters (largest part 4 of 8 cells); types b and c split a third cluster (2 of 2 each)."""
    latent = _tight_clusters([4, 4, 4])
    labels = np.array(["a"] * 8 + ["b", "b", "c", "c"])
    assert graph_connectivity(latent, labels, n_neighbors=4) == pytest.approx((0.5 + 1 + 1) / 3)
    assert graph_connectivity(latent, np.repeat(["a", "b", "c"], 4), n_neighbors=4) == pytest.approx(1.0)


def test_scib_ilisi_differs_from_the_equal_weight_kNN_version(reference_data):
    """On the same latent the equal-weight version reads 0.93 where scIB's iLISI (checked against
    scib-metrics below) reads 0.73: the reason for the rename."""
    latent, batch, _ = reference_data
    assert ilisi(latent, batch) == pytest.approx(0.732, abs=0.005)
    assert knn_batch_inverse_simpson(latent, batch, k=89) == pytest.approx(0.928, abs=0.005)


def test_bad_input_is_refused(reference_data):
    latent, batch, labels = reference_data
    with pytest.raises(InputDataError, match="at least two"):
        ilisi(latent, np.zeros(latent.shape[0]))
    with pytest.raises(ConfigError, match="lower perplexity"):
        lisi(latent[:50], batch[:50])
    with pytest.raises(ConfigError, match="perplexity=5"):
        lisi(latent, batch, perplexity=5, n_neighbors=6)
    with pytest.raises(ConfigError, match="alpha"):
        kbet(latent, batch, alpha=0)
    with pytest.raises(InputDataError, match="missing values"):
        lisi(latent, np.where(np.arange(latent.shape[0]) == 3, None, batch))
    with pytest.raises(InputDataError, match="one entry per cell"):
        graph_connectivity(latent, labels[:-1])


def test_lisi_matches_harmonypy(reference_data):
    harmonypy = pytest.importorskip("harmonypy")
    latent, batch, labels = reference_data
    metadata = pd.DataFrame({"batch": batch, "labels": labels})
    reference = harmonypy.compute_lisi(latent, metadata, ["batch", "labels"], perplexity=30)
    # harmonypy 2 (C++) searches 3 * perplexity neighbours besides the cell; harmonypy 0.x, Harmony's R
    # package and scib-metrics search 3 * perplexity with the cell among them
    n_neighbors = 91 if int(version("harmonypy").split(".")[0]) >= 2 else 90
    for column, values in enumerate((batch, labels)):
        np.testing.assert_allclose(lisi(latent, values, n_neighbors=n_neighbors), reference[:, column], rtol=1e-6)


@pytest.fixture(scope="module")
def scib_neighbours(reference_data):
    """scib-metrics' neighbour record of the reference data from exact neighbours (the cell first)."""
    pytest.importorskip("scib_metrics")
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    latent = reference_data[0]
    distances, indices = NearestNeighbors(n_neighbors=90).fit(latent).kneighbors(latent)
    assert np.array_equal(indices[:, 0], np.arange(latent.shape[0]))
    return NeighborsResults(indices=indices, distances=distances)


def test_metrics_match_scib_metrics(reference_data, scib_neighbours):
    import scib_metrics

    latent, batch, labels = reference_data
    # scib-metrics computes LISI in float32 (jax): agreement to about 1e-6 relative
    np.testing.assert_allclose(lisi(latent, batch), scib_metrics.lisi_knn(scib_neighbours, batch), rtol=1e-4)
    assert ilisi(latent, batch) == pytest.approx(float(scib_metrics.ilisi_knn(scib_neighbours, batch)), abs=1e-5)
    assert clisi(latent, labels) == pytest.approx(float(scib_metrics.clisi_knn(scib_neighbours, labels)), abs=1e-5)
    acceptance, _, _ = scib_metrics.kbet(scib_neighbours.subset_neighbors(50), batch)
    assert kbet(latent, batch, n_neighbors=50) == pytest.approx(float(acceptance), abs=1 / latent.shape[0])
    connectivity = scib_metrics.graph_connectivity(scib_neighbours.subset_neighbors(15), labels)
    assert graph_connectivity(latent, labels, n_neighbors=15) == pytest.approx(float(connectivity))


def test_diffusion_embedding_matches_scanpy_diffmap(reference_data):
    """Distances between our multiscale diffusion coordinates equal those rebuilt from scanpy's
    ``tl.diffmap`` eigenpairs (eigenvector signs may differ; distances cannot)."""
    import scanpy as sc
    from anndata import AnnData
    from scipy.spatial.distance import pdist

    from genailab.eval import diffusion_embedding

    graph = AnnData(obsm={"X_latent": reference_data[0][:200]})
    sc.pp.neighbors(graph, n_neighbors=15, use_rep="X_latent", transformer="sklearn")
    sc.tl.diffmap(graph, n_comps=20)
    values = graph.uns["diffmap_evals"].astype(np.float64)
    assert values[0] == pytest.approx(1.0, abs=1e-5)  # the stationary component comes first
    weights = np.concatenate([[1.0], values[1:] / (1 - values[1:])])
    expected = pdist(graph.obsm["X_diffmap"].astype(np.float64) * weights)
    ours = pdist(diffusion_embedding(graph.obsp["connectivities"], n_components=20))
    np.testing.assert_allclose(ours, expected, rtol=1e-3, atol=1e-5)


def test_kbet_per_label_by_hand():
    """Cell type a: batches x and y in two far-apart clusters of 40 (two graph components, both at
    least 3 * k0 = 30 cells, kept): neighbourhoods are pure and rejected but one (1 of 80, as
    scib-metrics finds on the same input), whose diffusion neighbours reach the other component.
    Type b: four clusters of 20 (components below 30 cells, none kept): 0. Type c: a single batch,
    d: 9 cells: skipped."""
    from genailab.eval import kbet_label_table, kbet_per_label

    latent = _tight_clusters([40, 40, 20, 20, 20, 20, 30, 9])
    labels = np.repeat(["a", "b", "c", "d"], [80, 80, 30, 9])
    batch = np.concatenate(
        [np.repeat(["x", "y"], 40), np.tile(np.repeat(["x", "y"], 10), 4), ["x"] * 30, ["x", "y"] * 4 + ["x"]]
    )
    table = kbet_label_table(latent, batch, labels, n_neighbors=15).set_index("label")
    assert table["n_cells"].tolist() == [80, 80, 30, 9]
    assert table["k0"].tolist() == [10, 10, 10, 10]  # a quarter of 40 cells per batch is 10; bounded below by 10
    assert table.loc["a", "kbet"] < 0.05
    assert table.loc["b", "kbet"] == 0.0
    assert table.loc[["c", "d"], "kbet"].isna().all()
    assert kbet_per_label(latent, batch, labels, n_neighbors=15) == pytest.approx(table.loc["a", "kbet"] / 2)
    # 400 cells per batch: a quarter is 100, bounded above by 70
    many = kbet_label_table(np.random.default_rng(0).normal(size=(800, 3)), np.repeat(["x", "y"], 400), ["a"] * 800)
    assert many["k0"].tolist() == [70]


def test_kbet_per_label_matches_scib_metrics(reference_data, scib_neighbours):
    import scib_metrics
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    from genailab.eval import kbet_label_table, kbet_per_label

    latent, batch, labels = reference_data
    reference, per_label = scib_metrics.kbet_per_label(scib_neighbours.subset_neighbors(50), batch, labels, return_df=True)
    ours = kbet_label_table(latent, batch, labels)
    np.testing.assert_allclose(ours["kbet"], per_label.sort_values("cluster")["kBET"], atol=1e-9)
    # a latent where batch 1 sits apart: per-label kBET drops well below 1, still agreeing
    apart = latent.copy()
    apart[:, 0] += 3.0 * (batch == "1")
    distances, indices = NearestNeighbors(n_neighbors=50).fit(apart).kneighbors(apart)
    reference = scib_metrics.kbet_per_label(NeighborsResults(indices=indices, distances=distances), batch, labels)
    assert kbet_per_label(apart, batch, labels) == pytest.approx(float(reference), abs=1e-9)
    assert float(reference) < 0.5
