"""scIB's batch-integration metrics as scib-metrics computes them: iLISI, cLISI, kBET, graph connectivity.

* :func:`lisi`: Harmony's local inverse Simpson index per cell (Korsunsky et al., Nat. Methods 2019);
* :func:`ilisi` and :func:`clisi`: its median over cells, scaled to [0, 1] as in scib-metrics
  (Luecken et al., Nat. Methods 2022);
* :func:`kbet`: the kBET acceptance rate (Büttner et al., Nat. Methods 2019) over all cells, as
  ``scib_metrics.kbet`` computes it;
* :func:`kbet_per_label`: the variant scIB's tables report, kBET within each cell type on
  diffusion-map neighbours, averaged over cell types (``scib_metrics.kbet_per_label``);
* :func:`graph_connectivity`: per label, the share of the label's cells in the largest connected
  part of the kNN graph restricted to them, averaged over labels.

Neighbours are exact Euclidean nearest neighbours (scikit-learn). As in scib-metrics, an
``n_neighbors`` counts the cell itself: the cell and its ``n_neighbors - 1`` nearest other cells.
scib-metrics' default neighbours come from approximate PyNNDescent search, so its figures can differ
from ours in the third decimal on large data; on the same neighbours they agree (tests/eval).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.stats import chi2
from sklearn.neighbors import NearestNeighbors

from genailab.checks import check_number
from genailab.errors import ConfigError, InputDataError
from genailab.eval._inputs import as_labels, latent_and_labels
from genailab.eval.latent import neighbour_graph

PERPLEXITY_TOLERANCE = 1e-5  # |entropy - log(perplexity)| at which the bandwidth search stops (Harmony's)
PERPLEXITY_MAX_STEPS = 50  # bisection steps at most (Harmony's)
KBET_LABEL_MIN_CELLS = 10  # scIB skips cell types with fewer cells
KBET_LABEL_K_RANGE = (10, 70)  # scIB's bounds on a cell type's kBET neighbourhood
KBET_MIN_COVERED = 0.75  # share of a cell type's cells in large graph components below which it scores 0


def _other_neighbours(latent: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances to and indices of each cell's ``n_neighbors - 1`` nearest other cells,
    both (n_cells, n_neighbors - 1), nearest first."""
    n_cells = latent.shape[0]
    if not 2 <= n_neighbors <= n_cells:
        raise ConfigError(
            f"n_neighbors={n_neighbors} (the cell itself included) must be between 2 and the number of "
            f"cells ({n_cells}); lower it or pass more cells."
        )
    return NearestNeighbors(n_neighbors=n_neighbors - 1).fit(latent).kneighbors()


def _codes(values: np.ndarray, *, name: str, what: str) -> tuple[np.ndarray, int]:
    codes, uniques = pd.factorize(values)
    if uniques.size < 2:
        raise InputDataError(f"{name} has a single value; {what} needs at least two.")
    return codes, int(uniques.size)


def _entropy_and_weights(distances: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entropy (n_cells,) and weights (n_cells, m) of the kernel ``exp(-beta * d)`` over each row.

    ``distances`` are shifted so that each row's nearest is at 0: the normalised weights and the
    entropy do not change, and the kernel cannot underflow to all zeros.
    """
    kernel = np.exp(-distances * beta[:, None])  # (n_cells, m)
    total = kernel.sum(axis=1)
    entropy = np.log(total) + beta * (distances * kernel).sum(axis=1) / total
    return entropy, kernel / total[:, None]


def _perplexity_weights(distances: np.ndarray, perplexity: float) -> np.ndarray:
    """Gaussian-kernel neighbour weights whose perplexity ``exp(entropy)`` is ``perplexity`` per cell.

    Harmony's search: the precision ``beta`` starts at 1 and is doubled (halved) while the entropy is
    too high (low) and no bracket is known, then bisected within the bracket, until the entropy is
    within :data:`PERPLEXITY_TOLERANCE` of ``log(perplexity)`` or after :data:`PERPLEXITY_MAX_STEPS`
    steps. All cells are searched at once.

    Parameters
    ----------
    distances
        Distances to each cell's other neighbours, (n_cells, m), nearest first.
    perplexity
        Effective number of neighbours, below m.

    Returns
    -------
    numpy.ndarray
        Weights, (n_cells, m), each row summing to 1.
    """
    shifted = distances - distances[:, :1]
    target = np.log(perplexity)
    beta = np.ones(shifted.shape[0])
    low, high = np.full_like(beta, -np.inf), np.full_like(beta, np.inf)
    entropy, weights = _entropy_and_weights(shifted, beta)
    for _ in range(PERPLEXITY_MAX_STEPS):
        excess = entropy - target
        active = np.abs(excess) >= PERPLEXITY_TOLERANCE
        if not active.any():
            break
        sharpen, widen = active & (excess > 0), active & (excess <= 0)
        new_beta = beta.copy()
        new_beta[sharpen] = np.where(np.isinf(high), 2 * beta, (beta + high) / 2)[sharpen]
        new_beta[widen] = np.where(np.isinf(low), beta / 2, (beta + low) / 2)[widen]
        low[sharpen], high[widen] = beta[sharpen], beta[widen]
        beta = new_beta
        new_entropy, new_weights = _entropy_and_weights(shifted[active], beta[active])
        entropy[active], weights[active] = new_entropy, new_weights
    return weights


def lisi(latent, labels, *, perplexity: float = 30, n_neighbors: int | None = None) -> np.ndarray:
    """Harmony's local inverse Simpson index (LISI) of ``labels`` around every cell.

    Each cell's other neighbours are weighted by a Gaussian kernel of their Euclidean distance,
    ``exp(-beta * d)``, with ``beta`` found per cell so that the weights have the given perplexity
    (effective number of neighbours); the LISI is ``1 / sum_l p_l**2`` where ``p_l`` is the weight
    on label ``l``. It is the effective number of labels in the neighbourhood: 1 when all weight is
    on one label, up to the number of labels. This is ``harmonypy.compute_lisi`` and
    ``scib_metrics.lisi_knn`` on exact neighbours.

    Parameters
    ----------
    latent
        Coordinates, (n_cells, n_dims).
    labels
        Batch or cell type of each cell, (n_cells,).
    perplexity
        Effective neighbourhood size (30 in Harmony and scIB).
    n_neighbors
        Neighbourhood searched, the cell itself included (and given no weight); default
        ``3 * perplexity`` (90), as in Harmony and scib-metrics.

    Returns
    -------
    numpy.ndarray
        LISI per cell, (n_cells,), between 1 and the number of labels.
    """
    latent, labels = latent_and_labels(latent, labels, name="labels")
    return _lisi(latent, labels, perplexity=perplexity, n_neighbors=n_neighbors)


def _lisi(latent: np.ndarray, labels: np.ndarray, *, perplexity: float, n_neighbors: int | None) -> np.ndarray:
    """:func:`lisi` of a checked latent (n_cells, n_dims) and labels (n_cells,)."""
    n_neighbors = int(3 * perplexity) if n_neighbors is None else n_neighbors
    if not 1 <= perplexity < n_neighbors - 1:
        raise ConfigError(
            f"perplexity={perplexity} must be at least 1 and below the {n_neighbors - 1} other neighbours "
            f"searched (n_neighbors={n_neighbors}); lower perplexity or raise n_neighbors."
        )
    if n_neighbors > latent.shape[0]:
        raise ConfigError(
            f"LISI at perplexity {perplexity} searches {n_neighbors} neighbours but there are only "
            f"{latent.shape[0]} cells; lower perplexity to at most {latent.shape[0] // 3}."
        )
    distances, neighbours = _other_neighbours(latent, n_neighbors)
    weights = _perplexity_weights(distances, perplexity)  # (n_cells, n_neighbors - 1)
    codes, uniques = pd.factorize(labels)
    label_weights = np.zeros((latent.shape[0], uniques.size))
    np.add.at(label_weights, (np.arange(latent.shape[0])[:, None], codes[neighbours]), weights)
    return 1 / np.sum(label_weights**2, axis=1)


def ilisi(latent, batch, *, perplexity: float = 30, n_neighbors: int | None = None) -> float:
    """scIB's integration LISI: median LISI of batch, scaled to [0, 1] as ``(median - 1) / (n_batches - 1)``.

    Parameters
    ----------
    latent
        Coordinates, (n_cells, n_dims).
    batch
        Batch of each cell, (n_cells,); at least two batches.
    perplexity, n_neighbors
        As in :func:`lisi`.

    Returns
    -------
    float
        1 = every neighbourhood holds all batches in equal weight; 0 = each holds a single batch.
        Unequal batch sizes lower the ceiling below 1 even when mixing is perfect.
    """
    latent, batch = latent_and_labels(latent, batch, name="batch")
    _, n_batches = _codes(batch, name="batch", what="batch mixing")
    per_cell = _lisi(latent, batch, perplexity=perplexity, n_neighbors=n_neighbors)
    return float((np.median(per_cell) - 1) / (n_batches - 1))


def clisi(latent, labels, *, perplexity: float = 30, n_neighbors: int | None = None) -> float:
    """scIB's cell-type LISI: median LISI of labels, scaled as ``(n_labels - median) / (n_labels - 1)``.

    Parameters
    ----------
    latent
        Coordinates, (n_cells, n_dims).
    labels
        Cell type of each cell, (n_cells,); at least two types.
    perplexity, n_neighbors
        As in :func:`lisi`.

    Returns
    -------
    float
        1 = every neighbourhood holds a single cell type; 0 = all types in equal weight.
    """
    latent, labels = latent_and_labels(latent, labels, name="labels")
    _, n_labels = _codes(labels, name="labels", what="cLISI")
    per_cell = _lisi(latent, labels, perplexity=perplexity, n_neighbors=n_neighbors)
    return float((n_labels - np.median(per_cell)) / (n_labels - 1))


def kbet(latent, batch, *, n_neighbors: int = 50, alpha: float = 0.05) -> float:
    """kBET acceptance rate: share of neighbourhoods whose batch mix matches the whole data's.

    For each cell, the batch counts among the cell and its ``n_neighbors - 1`` nearest others are
    compared with the counts expected from the batches' overall shares by Pearson's chi-square test
    (``n_batches - 1`` degrees of freedom); a neighbourhood is accepted when its p-value is at
    least ``alpha``. This is ``scib_metrics.kbet``; scIB's tables report the per-cell-type variant,
    :func:`kbet_per_label`.

    Parameters
    ----------
    latent
        Coordinates, (n_cells, n_dims).
    batch
        Batch of each cell, (n_cells,); at least two batches.
    n_neighbors
        Neighbourhood size, the cell itself included.
    alpha
        Significance level of the test.

    Returns
    -------
    float
        In [0, 1], 1 best: the share of cells whose neighbourhood is not rejected.
    """
    latent, batch = latent_and_labels(latent, batch, name="batch")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha={alpha} must lie strictly between 0 and 1, e.g. 0.05.")
    codes, _ = _codes(batch, name="batch", what="kBET")
    _, neighbours = _other_neighbours(latent, n_neighbors)
    return _acceptance_rate(codes, neighbours, alpha=alpha)


def _acceptance_rate(codes: np.ndarray, neighbours: np.ndarray, *, alpha: float) -> float:
    """kBET's share of accepted neighbourhoods: batch codes (n_cells,) of cells whose nearest other
    cells are ``neighbours`` (n_cells, k - 1); expected counts come from the batches' shares in ``codes``."""
    n_batches = int(codes.max()) + 1
    members = np.concatenate([codes[:, None], codes[neighbours]], axis=1)  # (n_cells, k)
    observed = np.stack([(members == b).sum(axis=1) for b in range(n_batches)], axis=1)
    expected = np.bincount(codes, minlength=n_batches) / codes.size * members.shape[1]  # (n_batches,)
    statistic = np.sum((observed - expected) ** 2 / expected, axis=1)
    return float(np.mean(chi2.sf(statistic, df=n_batches - 1) >= alpha))


def diffusion_embedding(connectivities: sp.spmatrix, *, n_components: int = 100) -> np.ndarray:
    """Multiscale diffusion-map coordinates of a connected graph, (n_cells, n_components).

    The graph's kernel is density-normalised (Coifman and Lafon's alpha = 1, as scanpy's ``diffmap``
    does) and made symmetric; its leading eigenvectors are each scaled by ``l / (1 - l)`` for
    eigenvalue ``l`` (the sum of ``l ** t`` over all diffusion times ``t``), the stationary one by 1.
    Euclidean distances between these coordinates approximate diffusion distances.

    Parameters
    ----------
    connectivities
        Symmetric non-negative weights, (n_cells, n_cells), e.g. scanpy's ``obsp["connectivities"]``.
    n_components
        Eigenvectors kept; at most ``n_cells - 1``.
    """
    from scipy.linalg import eigh
    from scipy.sparse.linalg import eigsh

    kernel = sp.csr_matrix(connectivities, dtype=np.float64, copy=True)
    density = np.asarray(kernel.sum(axis=0)).ravel()
    kernel = sp.diags(1 / density) @ kernel @ sp.diags(1 / density)
    scale = 1 / np.sqrt(np.asarray(kernel.sum(axis=0)).ravel())
    symmetric = sp.diags(scale) @ kernel @ sp.diags(scale)
    n_cells = kernel.shape[0]
    n_components = min(n_components, n_cells - 1)
    if 2 * n_components >= n_cells:  # most of the spectrum: the dense solver, exact and faster
        values, vectors = eigh(symmetric.toarray())
        largest = np.argsort(np.abs(values))[::-1][:n_components]
        values, vectors = values[largest], vectors[:, largest]
    else:
        values, vectors = eigsh(symmetric, k=n_components, which="LM", v0=np.ones(n_cells))
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    weights = np.ones_like(values)  # the stationary components (eigenvalue 1) keep weight 1
    moving = ~np.isclose(values, 1.0)
    weights[moving] = values[moving] / (1.0 - values[moving])
    return vectors * weights


def kbet_per_label(
    latent, batch, labels, *, n_neighbors: int = 50, alpha: float = 0.05, diffusion_components: int = 100
) -> float:
    """scIB's kBET: the acceptance rate within each cell type, averaged over the cell types scored.

    In [0, 1], 1 best; NaN when every cell type was skipped. :func:`kbet_label_table` gives the
    score of each cell type and documents the procedure and the arguments.
    """
    table = kbet_label_table(
        latent, batch, labels, n_neighbors=n_neighbors, alpha=alpha, diffusion_components=diffusion_components
    )
    scored = table["kbet"].dropna()
    return float(scored.mean()) if scored.size else float("nan")


def kbet_label_table(
    latent, batch, labels, *, n_neighbors: int = 50, alpha: float = 0.05, diffusion_components: int = 100
) -> pd.DataFrame:
    """kBET of each cell type as scIB computes it (scib-metrics' ``kbet_per_label``).

    The kNN graph of all cells (``n_neighbors``, the cell itself included) is turned into UMAP
    connectivities by scanpy. For each cell type, the graph restricted to its cells gives
    diffusion-map coordinates (:func:`diffusion_embedding`), in which each cell and its ``k0``
    nearest others form its neighbourhood, ``k0`` being a quarter of the cell type's mean cells per
    batch, bounded to [10, 70]; the cell type's score is the kBET acceptance rate of these
    neighbourhoods (:func:`kbet`, expected counts from the batches' shares within the cell type).
    Cell types with fewer than 10 cells or a single batch are skipped. When the restricted graph
    falls apart, components smaller than ``3 * k0`` are left out, and a cell type whose large
    components hold less than 75% of its cells scores 0 (as do cell types too small for a
    ``k0``-neighbourhood).

    Parameters
    ----------
    latent
        Coordinates, (n_cells, n_dims).
    batch
        Batch of each cell, (n_cells,); at least two batches.
    labels
        Cell type of each cell, (n_cells,).
    n_neighbors
        Neighbourhood size of the graph the connectivities come from (50 in scib-metrics).
    alpha
        Significance level of each neighbourhood's chi-square test.
    diffusion_components
        Diffusion-map components (scib-metrics' 100; fewer on small cell types).

    Returns
    -------
    pandas.DataFrame
        One row per cell type (sorted): ``label``, ``n_cells``, ``k0`` and ``kbet`` (NaN when skipped).
    """
    latent, batch = latent_and_labels(latent, batch, name="batch")
    labels = as_labels(labels, n_cells=latent.shape[0], name="labels")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha={alpha} must lie strictly between 0 and 1, e.g. 0.05.")
    check_number("diffusion_components", diffusion_components, integer=True, ge=1)
    codes, _ = _codes(batch, name="batch", what="kBET")
    connectivities = neighbour_graph(latent, n_neighbors=n_neighbors, seed=0).obsp["connectivities"]
    rows = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        label_codes = pd.factorize(codes[members])[0]
        per_batch = np.bincount(label_codes)
        k0 = int(np.clip(np.floor(per_batch.mean() / 4), *KBET_LABEL_K_RANGE))
        score = np.nan
        if members.size >= KBET_LABEL_MIN_CELLS and per_batch.size > 1:
            graph = sp.csr_matrix(connectivities[members][:, members])
            score = _label_acceptance(graph, label_codes, k0=k0, alpha=alpha, n_components=diffusion_components)
        rows.append({"label": label, "n_cells": int(members.size), "k0": k0, "kbet": score})
    return pd.DataFrame(rows)


def _label_acceptance(graph: sp.spmatrix, codes: np.ndarray, *, k0: int, alpha: float, n_components: int) -> float:
    """kBET of one cell type on diffusion neighbours of its (possibly disconnected) graph."""
    _, component = connected_components(graph, directed=True, connection="strong")
    sizes = np.bincount(component)
    kept = np.flatnonzero(sizes[component] >= 3 * k0) if sizes.size > 1 else np.arange(codes.size)
    if kept.size < KBET_MIN_COVERED * codes.size:
        return 0.0
    if kept.size <= k0:
        return 0.0  # too few cells for a k0-neighbourhood: every cell rejected
    coordinates = diffusion_embedding(graph[kept][:, kept], n_components=n_components)
    neighbours = NearestNeighbors(n_neighbors=k0).fit(coordinates).kneighbors(return_distance=False)
    kept_codes = pd.factorize(codes[kept])[0]
    if kept_codes.max() == 0:
        return 0.0  # the large components hold a single batch
    return _acceptance_rate(kept_codes, neighbours, alpha=alpha)


def graph_connectivity(latent, labels, *, n_neighbors: int = 15) -> float:
    """Per label, the share of its cells in the largest strongly connected part of its kNN subgraph.

    The directed graph links each cell to its ``n_neighbors - 1`` nearest other cells (among all
    cells); for each label, the edges between the label's cells are kept and the size of the largest
    strongly connected component is divided by the label's cell count. The mean over labels is
    returned, as ``scib_metrics.graph_connectivity`` computes it (scIB's original uses scanpy's
    symmetric graph, where strong and weak components coincide).

    Parameters
    ----------
    latent
        Coordinates, (n_cells, n_dims).
    labels
        Cell type of each cell, (n_cells,).
    n_neighbors
        Neighbourhood size, the cell itself included (15 in scib-metrics).

    Returns
    -------
    float
        In (0, 1], 1 best: every label's cells form one connected neighbourhood graph.
    """
    latent, labels = latent_and_labels(latent, labels, name="labels")
    _, neighbours = _other_neighbours(latent, n_neighbors)
    n_cells, n_other = neighbours.shape
    rows = np.repeat(np.arange(n_cells), n_other)
    graph = sp.csr_matrix((np.ones(rows.size), (rows, neighbours.ravel())), shape=(n_cells, n_cells))
    shares = []
    for label in pd.unique(labels):
        members = np.flatnonzero(labels == label)
        _, component = connected_components(graph[members][:, members], directed=True, connection="strong")
        shares.append(np.bincount(component).max() / members.size)
    return float(np.mean(shares))
