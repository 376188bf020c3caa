"""Metrics of a latent space: does it keep cell types apart and mix batches (scib conventions)?

Every score lies in [0, 1] with 1 best, as in scib (Luecken et al., Nat. Methods 2022):

* bio conservation: :func:`leiden_ari_nmi` (and the scib-style resolution sweep
  :func:`leiden_ari_nmi_best_resolution`), :func:`label_silhouette`;
* batch mixing: :func:`batch_silhouette`, and two simple kNN summaries of the batch mix,
  :func:`knn_batch_entropy` and :func:`knn_batch_inverse_simpson`.

scIB's iLISI, cLISI, kBET and graph connectivity are in :mod:`genailab.eval.integration`.
The kNN metrics here use exact Euclidean neighbours from scikit-learn, each cell excluded from its
own neighbourhood.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData
from scipy.special import entr
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_samples, silhouette_score
from sklearn.neighbors import NearestNeighbors

from genailab.errors import ConfigError, InputDataError
from genailab.eval._inputs import as_labels, latent_and_labels

SCIB_RESOLUTIONS = tuple(round(0.1 * i, 1) for i in range(1, 21))  # 0.1, 0.2, ..., 2.0 as in scib


def neighbour_graph(latent: np.ndarray, *, n_neighbors: int, seed: int) -> AnnData:
    """An obs-only AnnData holding scanpy's kNN graph of the latent."""
    if not 2 <= n_neighbors < latent.shape[0]:
        raise ConfigError(
            f"n_neighbors={n_neighbors} must be at least 2 and below the number of cells ({latent.shape[0]})."
        )
    graph = AnnData(obs=pd.DataFrame(index=[str(i) for i in range(latent.shape[0])]), obsm={"X_latent": latent})
    # exact sklearn neighbours at every size: scanpy's default switches to PyNNDescent above 8192 cells,
    # whose sparse-array output scanpy 1.11 cannot read with scipy >= 1.15 (no csr_array.getnnz)
    sc.pp.neighbors(graph, n_neighbors=n_neighbors, use_rep="X_latent", random_state=seed, transformer="sklearn")
    return graph


def _cluster_agreement(graph: AnnData, labels: np.ndarray, *, resolution: float, seed: int) -> dict[str, float]:
    sc.tl.leiden(
        graph,
        resolution=resolution,
        random_state=seed,
        flavor="igraph",
        n_iterations=2,
        directed=False,
        key_added="leiden",
    )
    clusters = graph.obs["leiden"].to_numpy()
    return {
        "ari": float(adjusted_rand_score(labels, clusters)),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "n_clusters": int(np.unique(clusters).size),
        "resolution": float(resolution),
    }


def leiden_ari_nmi(
    latent, labels, *, resolution: float = 1.0, n_neighbors: int = 15, seed: int = 0
) -> dict[str, float]:
    """Agreement between Leiden clusters of the latent and known labels (ARI and NMI).

    Builds scanpy's kNN graph on the latent, runs Leiden (igraph flavour) at one resolution and
    compares the clusters with ``labels`` by scikit-learn's adjusted Rand index and normalised
    mutual information.

    Parameters
    ----------
    latent
        Latent coordinates, (n_cells, n_latent).
    labels
        Known groups (e.g. cell types), (n_cells,).
    resolution
        Leiden resolution; higher gives more clusters.
    n_neighbors
        Neighbours per cell in the kNN graph.
    seed
        Random state of the neighbour search and of Leiden.

    Returns
    -------
    dict
        ``ari`` and ``nmi`` (1 = clusters equal the labels), ``n_clusters`` and ``resolution``.

    Examples
    --------
    >>> scores = leiden_ari_nmi(adata.obsm["X_latent"], adata.obs["cell_type"])  # doctest: +SKIP
    """
    latent, labels = latent_and_labels(latent, labels, name="labels")
    graph = neighbour_graph(latent, n_neighbors=n_neighbors, seed=seed)
    return _cluster_agreement(graph, labels, resolution=resolution, seed=seed)


def leiden_ari_nmi_best_resolution(
    latent, labels, *, resolutions: tuple[float, ...] = SCIB_RESOLUTIONS, n_neighbors: int = 15, seed: int = 0
) -> dict[str, float]:
    """As :func:`leiden_ari_nmi` at the resolution with the highest NMI among ``resolutions``.

    This is scib's protocol (``cluster_optimal_resolution`` over 0.1, 0.2, ..., 2.0). It looks at
    the labels to choose the resolution, so it is optimistic; compare models with the same sweep.

    Parameters
    ----------
    latent
        Latent coordinates, (n_cells, n_latent).
    labels
        Known groups (e.g. cell types), (n_cells,).
    resolutions
        Leiden resolutions to try.
    n_neighbors
        Neighbours per cell in the kNN graph (built once for all resolutions).
    seed
        Random state of the neighbour search and of Leiden.

    Returns
    -------
    dict
        ``ari``, ``nmi``, ``n_clusters`` and ``resolution`` at the chosen resolution.
    """
    if len(resolutions) == 0:
        raise ConfigError("resolutions is empty; pass at least one Leiden resolution, e.g. (0.5, 1.0).")
    latent, labels = latent_and_labels(latent, labels, name="labels")
    graph = neighbour_graph(latent, n_neighbors=n_neighbors, seed=seed)
    sweep = [_cluster_agreement(graph, labels, resolution=r, seed=seed) for r in resolutions]
    return max(sweep, key=lambda scores: scores["nmi"])


def label_silhouette(latent, labels) -> float:
    """Average silhouette width of the labels in the latent, rescaled to [0, 1] as ``(asw + 1) / 2``.

    Parameters
    ----------
    latent
        Latent coordinates, (n_cells, n_latent).
    labels
        Known groups (e.g. cell types), (n_cells,); at least two groups.

    Returns
    -------
    float
        1 = tight, well separated groups; 0.5 = no structure; 0 = cells closer to other groups.
    """
    latent, labels = latent_and_labels(latent, labels, name="labels")
    n_groups = pd.unique(labels).size
    if not 2 <= n_groups < latent.shape[0]:
        raise InputDataError(f"labels has {n_groups} groups; a silhouette needs between 2 and n_cells - 1 groups.")
    return float((silhouette_score(latent, labels, metric="euclidean") + 1) / 2)


def batch_silhouette(latent, batch, labels) -> float:
    """scib's batch silhouette: within each label, ``1 - |silhouette of batch|``, averaged.

    Per cell type, the silhouette of each cell with respect to batch is near 0 when batches
    overlap; ``1 - |s|`` is averaged over the cells of the type, then over types. Types with a
    single batch (or one cell per batch) are skipped, as in scib.

    Parameters
    ----------
    latent
        Latent coordinates, (n_cells, n_latent).
    batch
        Batch of each cell, (n_cells,).
    labels
        Cell type of each cell, (n_cells,).

    Returns
    -------
    float
        1 = batches perfectly mixed within every type; 0 = batches fully separated.
    """
    latent, batch = latent_and_labels(latent, batch, name="batch")
    labels = as_labels(labels, n_cells=latent.shape[0], name="labels")
    per_label = []
    for label in pd.unique(labels):
        in_label = labels == label
        n_batches = pd.unique(batch[in_label]).size
        if n_batches == 1 or n_batches == in_label.sum():
            continue
        silhouettes = silhouette_samples(latent[in_label], batch[in_label], metric="euclidean")
        per_label.append(np.mean(1 - np.abs(silhouettes)))
    if not per_label:
        raise InputDataError(
            "no label has cells from two or more batches (with more cells than batches), so batch mixing "
            "cannot be measured; check that batch and labels are the right columns."
        )
    return float(np.mean(per_label))


def _neighbour_batch_fractions(latent: np.ndarray, batch: np.ndarray, *, k: int) -> tuple[np.ndarray, int]:
    """Share of each batch among each cell's k nearest neighbours, (n_cells, n_batches)."""
    codes, uniques = pd.factorize(batch)
    n_batches = uniques.size
    if n_batches < 2:
        raise InputDataError("batch has a single value; batch mixing needs at least two batches.")
    if not 1 <= k < latent.shape[0]:
        raise ConfigError(f"k={k} must be at least 1 and below the number of cells ({latent.shape[0]}).")
    neighbours = NearestNeighbors(n_neighbors=k).fit(latent).kneighbors(return_distance=False)  # (n_cells, k)
    neighbour_codes = codes[neighbours]
    counts = np.stack([(neighbour_codes == b).sum(axis=1) for b in range(n_batches)], axis=1)
    return counts / k, n_batches


def knn_batch_entropy(latent, batch, *, k: int = 50) -> float:
    """Entropy of the batch mix among each cell's k nearest neighbours, normalised by log(n_batches).

    Parameters
    ----------
    latent
        Latent coordinates, (n_cells, n_latent).
    batch
        Batch of each cell, (n_cells,); at least two batches.
    k
        Neighbours per cell (the cell itself excluded).

    Returns
    -------
    float
        Mean over cells; 1 = every neighbourhood holds all batches equally, 0 = a single batch.
        Unequal batch sizes lower the ceiling below 1 even when mixing is perfect.
    """
    latent, batch = latent_and_labels(latent, batch, name="batch")
    fractions, n_batches = _neighbour_batch_fractions(latent, batch, k=k)
    return float(np.mean(entr(fractions).sum(axis=1) / np.log(n_batches)))


def knn_batch_inverse_simpson(latent, batch, *, k: int = 90) -> float:
    """Inverse Simpson index of batch among the k nearest neighbours, equal weights, scaled to [0, 1].

    Not scIB's iLISI (that is :func:`genailab.eval.integration.ilisi`, with Harmony's Gaussian
    weights at perplexity 30): each of the ``k`` nearest neighbours counts equally. The median over
    cells is scaled as ``(median - 1) / (n_batches - 1)``. It usually reads higher than iLISI on
    the same latent: far neighbours of other batches count as much as the nearest ones.

    Parameters
    ----------
    latent
        Latent coordinates, (n_cells, n_latent).
    batch
        Batch of each cell, (n_cells,); at least two batches.
    k
        Neighbours per cell (the cell itself excluded).

    Returns
    -------
    float
        1 = neighbourhoods hold all batches equally, 0 = each holds a single batch.
    """
    latent, batch = latent_and_labels(latent, batch, name="batch")
    fractions, n_batches = _neighbour_batch_fractions(latent, batch, k=k)
    inverse_simpson = 1 / np.sum(fractions**2, axis=1)
    return float((np.median(inverse_simpson) - 1) / (n_batches - 1))
