"""Label transfer: a weighted kNN vote of reference cells in the latent space a query was mapped into."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from anndata import AnnData
from sklearn.neighbors import NearestNeighbors

from genailab.apps._anndata import check_key_added, record_params
from genailab.checks import check_number
from genailab.errors import ConfigError, InputDataError

logger = logging.getLogger(__name__)

UNKNOWN = "unknown"


def transfer_labels(
    query: AnnData,
    reference: AnnData,
    *,
    label_key: str,
    latent_key: str = "X_genailab",
    n_neighbors: int = 15,
    unknown_threshold: float = 0.5,
    unknown_label: str = UNKNOWN,
    key_added: str | None = None,
) -> pd.Series:
    """Predict ``reference.obs[label_key]`` for every query cell from its nearest reference cells.

    Each query cell's ``n_neighbors`` nearest reference cells (Euclidean, in the shared latent
    ``obsm[latent_key]``) vote for their label with weight ``exp(-(d / s)^2)``, where ``d`` is the
    neighbour's distance and ``s`` the mean distance of the cell's neighbours: near neighbours count
    more, and the weights do not depend on the latent's scale. The winning label's share of the
    weight is the confidence; ``uncertainty = 1 - share``. A cell whose uncertainty is above
    ``unknown_threshold`` is called ``unknown_label``.

    Parameters
    ----------
    query
        Cells to label, with ``obsm[latent_key]`` (n_query, latent_dim), e.g. from the query model
        of :meth:`genailab.VAE.map_query`.
    reference
        Labelled cells in the same latent space: ``obsm[latent_key]`` (n_reference, latent_dim) and
        ``obs[label_key]``. Cells with a missing label do not vote.
    label_key
        ``reference.obs`` column of the labels (cell type...).
    latent_key
        ``obsm`` key of the latent in both AnnDatas.
    n_neighbors
        Reference cells that vote for each query cell.
    unknown_threshold
        Largest uncertainty still given a label, in [0, 1]; 1 never calls ``unknown_label``.
    unknown_label
        The call for uncertain cells; must not be one of the reference labels.
    key_added
        ``query.obs`` column of the predictions; default ``f"{label_key}_transferred"``.

    Returns
    -------
    The predictions (categorical of text labels, as scanpy's ``obs['leiden']``, indexed like
    ``query.obs``: integer reference labels come back as their text, e.g. ``"3"``, so compare with
    ``query.obs[label_key].astype(str)``). Sets ``query.obs[key_added]``,
    ``query.obs[f"{key_added}_uncertainty"]`` (float, 0 = unanimous) and
    ``query.uns[key_added]['params']``.

    Examples
    --------
    >>> query.obsm["X_genailab"] = query_model.get_latent()  # doctest: +SKIP
    >>> transfer_labels(query, reference, label_key="cell_type")  # doctest: +SKIP
    """
    key_added = check_key_added(key_added or f"{label_key}_transferred", None, where="obs")
    if key_added == label_key and label_key in query.obs.columns:
        raise ConfigError(f"key_added={key_added!r} is the query's own obs[{label_key!r}]: the transferred labels "
                          f"would replace it; choose another key_added (default {label_key + '_transferred'!r}).",
                          argument="key_added")  # fmt: skip
    check_number("unknown_threshold", unknown_threshold, ge=0, le=1)
    query_latent = _latent(query, latent_key, "query")
    reference_latent = _latent(reference, latent_key, "reference")
    if query_latent.shape[1] != reference_latent.shape[1]:
        raise InputDataError(
            f"The query latent has {query_latent.shape[1]} dimensions and the reference's {reference_latent.shape[1]}; "
            "embed both with the same model (the query model of map_query and its reference)."
        )
    labelled, names, codes = reference_labels(reference, label_key, n_neighbors=n_neighbors, unknown_label=unknown_label)
    distances, neighbours = NearestNeighbors(n_neighbors=n_neighbors).fit(reference_latent[labelled]).kneighbors(query_latent)
    weights = _vote_weights(distances)  # (n_query, k)
    votes = np.zeros((query_latent.shape[0], names.size))
    np.add.at(votes, (np.arange(votes.shape[0])[:, None], codes[neighbours]), weights)
    share = votes / votes.sum(axis=1, keepdims=True)
    winner = share.argmax(axis=1)
    uncertainty = 1.0 - share[np.arange(share.shape[0]), winner]
    called = np.where(uncertainty > unknown_threshold, unknown_label, names[winner])
    predictions = pd.Series(
        pd.Categorical(called, categories=[*names, unknown_label]), index=query.obs_names, name=key_added
    )
    query.obs[key_added] = predictions
    query.obs[f"{key_added}_uncertainty"] = uncertainty.astype(np.float32)
    params = dict(label_key=label_key, latent_key=latent_key, n_neighbors=n_neighbors,
                  unknown_threshold=unknown_threshold, unknown_label=unknown_label)  # fmt: skip
    record_params(query, key_added, params, n_unknown=int((called == unknown_label).sum()))
    return predictions


def reference_labels(
    reference: AnnData, label_key: str, *, n_neighbors: int = 15, unknown_label: str = UNKNOWN
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference labels ``transfer_labels`` votes with, checked (a column with enough labelled
    cells for ``n_neighbors`` voters): the labelled cells' mask (n_ref,), the sorted label names
    (n_labels,) and each labelled cell's code into them (n_labelled,). Needs no latent, so a caller
    can check the labels before it trains the model the latent comes from."""
    if label_key not in reference.obs.columns:
        raise ConfigError(f"reference.obs has no column {label_key!r} (columns: {list(reference.obs.columns)[:20]}).",
                          argument="label_key")
    labels = reference.obs[label_key]
    labelled = ~labels.isna().to_numpy()
    if not labelled.all():
        logger.warning("%d reference cells have no %r label and do not vote.", int((~labelled).sum()), label_key)
    names, codes = np.unique(labels[labelled].astype(str).to_numpy(), return_inverse=True)
    if unknown_label in names:
        raise ConfigError(f"{unknown_label!r} is a reference label; choose another unknown_label.")
    check_number("n_neighbors", n_neighbors, integer=True, ge=1)
    if not labelled.any():
        raise InputDataError(f"reference.obs[{label_key!r}] has no label: every value is missing; label the "
                             "reference cells (or name the column that holds their labels).", argument="label_key")
    if n_neighbors > int(labelled.sum()):
        raise ConfigError(f"n_neighbors={n_neighbors} must be between 1 and the {int(labelled.sum())} labelled reference cells.",
                          argument="n_neighbors")
    return labelled, names, codes


def _latent(adata: AnnData, key: str, which: str) -> np.ndarray:
    if key not in adata.obsm:
        raise ConfigError(
            f"The {which} has no obsm[{key!r}]; store its latent first, e.g. "
            f"adata.obsm[{key!r}] = model.get_latent(adata)."
        )
    latent = np.asarray(adata.obsm[key], dtype=np.float64)
    if latent.ndim != 2 or latent.shape[0] == 0 or not np.isfinite(latent).all():
        raise InputDataError(f"The {which}'s obsm[{key!r}] must be a finite (cells, dimensions) array with cells.")
    return latent


def _vote_weights(distances: np.ndarray) -> np.ndarray:
    """Gaussian kernel weights exp(-(d / s)^2) per neighbour, s = the cell's mean neighbour distance, (n, k)."""
    scale = distances.mean(axis=1, keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)  # all neighbours at distance 0 vote equally
    return np.exp(-((distances / scale) ** 2))
