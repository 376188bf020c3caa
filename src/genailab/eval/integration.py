"""scIB's batch-integration metrics as scib-metrics computes them: iLISI, cLISI, kBET, graph connectivity.

* :func:`lisi`: Harmony's local inverse Simpson index per cell (Korsunsky et al., Nat. Methods 2019);
* :func:`ilisi` and :func:`clisi`: its median over cells, scaled to [0, 1] as in scib-metrics
  (Luecken et al., Nat. Methods 2022);
* :func:`kbet`: the kBET acceptance rate (Büttner et al., Nat. Methods 2019) over all cells, as
  ``scib_metrics.kbet`` computes it;
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

from genailab.errors import ConfigError, InputDataError
from genailab.eval._inputs import as_dense, as_labels

PERPLEXITY_TOLERANCE = 1e-5  # |entropy - log(perplexity)| at which the bandwidth search stops (Harmony's)
PERPLEXITY_MAX_STEPS = 50  # bisection steps at most (Harmony's)


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
    latent = as_dense(latent, name="latent")
    labels = as_labels(labels, n_cells=latent.shape[0], name="labels")
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
    if (codes < 0).any():
        raise InputDataError("labels has missing values (NaN or None); drop those cells or give them a label.")
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
    _, n_batches = _codes(np.asarray(batch), name="batch", what="batch mixing")
    per_cell = lisi(latent, batch, perplexity=perplexity, n_neighbors=n_neighbors)
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
    _, n_labels = _codes(np.asarray(labels), name="labels", what="cLISI")
    per_cell = lisi(latent, labels, perplexity=perplexity, n_neighbors=n_neighbors)
    return float((n_labels - np.median(per_cell)) / (n_labels - 1))


def kbet(latent, batch, *, n_neighbors: int = 50, alpha: float = 0.05) -> float:
    """kBET acceptance rate: share of neighbourhoods whose batch mix matches the whole data's.

    For each cell, the batch counts among the cell and its ``n_neighbors - 1`` nearest others are
    compared with the counts expected from the batches' overall shares by Pearson's chi-square test
    (``n_batches - 1`` degrees of freedom); a neighbourhood is accepted when its p-value is at
    least ``alpha``. This is ``scib_metrics.kbet``; scIB's table reports a per-cell-type variant
    (``kbet_per_label``, on diffusion-map neighbours) that this function does not compute.

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
    latent = as_dense(latent, name="latent")
    batch = as_labels(batch, n_cells=latent.shape[0], name="batch")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha={alpha} must lie strictly between 0 and 1, e.g. 0.05.")
    codes, n_batches = _codes(batch, name="batch", what="kBET")
    _, neighbours = _other_neighbours(latent, n_neighbors)
    members = np.concatenate([codes[:, None], codes[neighbours]], axis=1)  # (n_cells, n_neighbors)
    observed = np.stack([(members == b).sum(axis=1) for b in range(n_batches)], axis=1)
    expected = np.bincount(codes, minlength=n_batches) / codes.size * n_neighbors  # (n_batches,)
    statistic = np.sum((observed - expected) ** 2 / expected, axis=1)
    return float(np.mean(chi2.sf(statistic, df=n_batches - 1) >= alpha))


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
    latent = as_dense(latent, name="latent")
    labels = as_labels(labels, n_cells=latent.shape[0], name="labels")
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
