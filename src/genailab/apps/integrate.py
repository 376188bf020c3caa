"""Batch correction: a conditional VAE whose latent an adversary cannot assign to a batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from genailab.apps._anndata import check_key_added, key_or_keys, labelled_cells, record_params, require_obs_column
from genailab.checks import check_library_size, check_number
from genailab.data.schema import category_label, category_labels
from genailab.errors import ConfigError, InputDataError
from genailab.model.adversary import BATCH_CORRECTION, AdversaryConfig
from genailab.train.config import TrainConfig



def integrate(
    adata: AnnData,
    *,
    batch_key: str,
    layer: str | None = None,
    likelihood: str = "nb",
    covariate_keys: Sequence[str] = (),
    adversary: AdversaryConfig | None = BATCH_CORRECTION,
    reference_batch: str | None = None,
    library_size: float = 1e4,
    key_added: str = "X_genailab_integrated",
    corrected_layer: str = "genailab_corrected",
    train: TrainConfig | None = None,
    **model_options,
):
    """Fit a batch-conditioned VAE with an adversarial batch discriminator on the latent, and correct.

    The decoder sees the batch, so it models the batch effect; the discriminator, trained to
    predict the batch from z, pushes the encoder to leave the batch out of z
    (:mod:`genailab.model.adversary`). Every cell is then decoded in ``reference_batch``.

    Parameters
    ----------
    adata
        Cells x genes with raw counts in ``layer`` and the batch in ``obs[batch_key]``.
    batch_key
        Categorical ``obs`` column of the batch (sample, donor, technology...).
    layer
        Layer with the values to model; None reads ``X``.
    likelihood
        ``"nb"``, ``"zinb"`` or ``"gaussian"`` (then ``layer`` must hold log-normalised values).
    covariate_keys
        Further categorical ``obs`` columns the model conditions on (not corrected for).
    adversary
        Weight, warm-up and mode (``"alternating"`` or ``"gradient_reversal"``) of the
        discriminator, default the ``batch_correction`` preset
        (:data:`~genailab.model.adversary.BATCH_CORRECTION`); None trains a plain
        batch-conditioned VAE (for comparison).
    reference_batch
        Batch every cell is decoded into for ``corrected_layer``; default the largest batch.
    library_size
        Total count per cell of the corrected expression (count models).
    key_added
        ``obsm`` key of the corrected latent; ``uns[key_added]['params']`` records the options.
    corrected_layer
        Layer of the batch-corrected expression (dense float32).
    train
        A :class:`~genailab.train.config.TrainConfig` (default: its defaults).
    **model_options
        Architecture options of :class:`~genailab.VAE` (``latent_dim``, ``hidden_dims``...).

    Returns
    -------
    The fitted :class:`~genailab.VAE`. Sets ``adata.obsm[key_added]`` (posterior means),
    ``adata.layers[corrected_layer]`` and ``adata.uns[key_added]['params']``.

    Examples
    --------
    >>> model = integrate(adata, batch_key="batch", train=TrainConfig(epochs=50))  # doctest: +SKIP
    >>> sc.pp.neighbors(adata, use_rep="X_genailab_integrated")  # doctest: +SKIP
    """
    from genailab.anndata_models.vae import VAE

    library_size = check_library_size(library_size)
    covariate_keys = key_or_keys(covariate_keys)
    check_key_added(key_added, None, where="obsm")
    check_key_added(corrected_layer, None, where="layers", argument="corrected_layer")
    if corrected_layer == layer:
        raise ConfigError(f"corrected_layer={corrected_layer!r} is the layer the model reads; choose another name.")
    require_obs_column(adata, batch_key, argument="batch_key")
    if batch_key in covariate_keys:
        raise ConfigError(f"{batch_key!r} is the batch; leave it out of covariate_keys.", argument="covariate_keys")
    for key in covariate_keys:
        require_obs_column(adata, key, argument="covariate_keys")
    batches = pd.Series(category_labels(adata.obs[batch_key]))  # as the model spells its categories
    if reference_batch is None:
        reference_batch = str(batches.value_counts().idxmax())
    elif category_label(reference_batch) not in set(batches):
        raise ConfigError(
            f"reference_batch={reference_batch!r} is not a value of obs[{batch_key!r}]: {sorted(set(batches))}."
        )
    train = train or TrainConfig()
    model = VAE(
        adata, likelihood=likelihood, layer=layer, condition_keys=[batch_key, *covariate_keys],
        adversarial_key=batch_key if adversary is not None else None, adversary=adversary, **model_options,
    )  # fmt: skip
    model.fit(train)
    adata.obsm[key_added] = model.get_latent(adata)
    options = {"library_size": library_size} if model.config.is_count_model else {}
    adata.layers[corrected_layer] = model.get_normalized_expression(
        adata, conditions={batch_key: reference_batch}, **options
    )
    record_params(
        adata, key_added,
        dict(batch_key=batch_key, layer=layer, likelihood=likelihood, covariate_keys=list(covariate_keys),
             adversary=None if adversary is None else adversary.to_dict(), reference_batch=reference_batch,
             library_size=library_size, corrected_layer=corrected_layer, epochs_trained=len(model.history)),
    )  # fmt: skip
    return model


def integration_scores(
    adata: AnnData,
    *,
    batch_key: str,
    label_key: str | None = None,
    key: str = "X_genailab_integrated",
    n_neighbors: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Batch mixing (and, with labels, cell-type conservation) of a latent (:mod:`genailab.eval`).

    Parameters
    ----------
    adata
        Cells with the latent in ``obsm[key]`` and the batch in ``obs[batch_key]``.
    batch_key
        ``obs`` column of the batch.
    label_key
        ``obs`` column of known cell types; adds the conservation scores and the batch silhouette.
    key
        ``obsm`` key of the latent.
    n_neighbors
        Neighbourhood size of the equal-weight kNN summaries (``knn_batch_inverse_simpson``; the
        batch entropy uses at most 50); default ``min(90, max(10, n_cells // 20))``, since
        neighbourhoods larger than a cell type's share of a batch hold several batches even when the
        batches are apart. scIB's metrics keep their own sizes (perplexity 30, at most a third of the
        cells; kBET 50 neighbours; graph connectivity 15).
    seed
        Random state of the neighbour graph and of Leiden.

    Returns
    -------
    dict
        Mixing, 1 best: scIB's ``ilisi`` and ``kbet`` (:mod:`genailab.eval.integration`),
        ``knn_batch_entropy``, ``knn_batch_inverse_simpson`` and with labels ``batch_silhouette`` and
        ``kbet_per_label`` (the kBET of scIB's tables, within each cell type).
        Conservation, 1 best (with labels): ``clisi``, ``graph_connectivity``, ``ari`` and ``nmi``
        (Leiden at the resolution with the best NMI, as in scib, recorded as ``leiden_resolution``)
        and ``label_silhouette``.
    """
    from genailab.eval import (
        batch_silhouette,
        clisi,
        graph_connectivity,
        ilisi,
        kbet,
        kbet_per_label,
        knn_batch_entropy,
        knn_batch_inverse_simpson,
        label_silhouette,
        leiden_ari_nmi_best_resolution,
    )

    check_number("n_neighbors", n_neighbors, integer=True, ge=1, allow_none=True)
    batched, labelled = check_scorable(adata, batch_key=batch_key, label_key=label_key)
    if key not in adata.obsm:
        raise InputDataError(f"obsm has no {key!r} (given as `key`); run integrate() first or choose one of "
                             f"{list(adata.obsm.keys())}.", argument="key")  # fmt: skip
    latent = np.asarray(adata.obsm[key])
    batch = adata.obs[batch_key].astype(str).to_numpy()
    n_batched = int(batched.sum())
    k = n_neighbors or min(90, max(10, n_batched // 20), n_batched - 1)
    scores = {
        "ilisi": ilisi(latent[batched], batch[batched], perplexity=min(30, n_batched // 3)),
        "kbet": kbet(latent[batched], batch[batched], n_neighbors=min(50, n_batched)),
        "knn_batch_entropy": knn_batch_entropy(latent[batched], batch[batched], k=min(50, k)),
        "knn_batch_inverse_simpson": knn_batch_inverse_simpson(latent[batched], batch[batched], k=k),
    }
    if label_key is not None:
        labels = adata.obs[label_key].astype(str).to_numpy()
        both = labelled & batched
        scores["batch_silhouette"] = batch_silhouette(latent[both], batch[both], labels[both])
        scores["kbet_per_label"] = kbet_per_label(latent[both], batch[both], labels[both],
                                                  n_neighbors=min(50, int(both.sum()) - 1))  # fmt: skip
        latent, labels, n_cells = latent[labelled], labels[labelled], int(labelled.sum())
        scores["clisi"] = clisi(latent, labels, perplexity=min(30, n_cells // 3))
        graph_k = min(15, n_cells - 1)  # scIB's 15 neighbours, fewer on a handful of cells
        scores["graph_connectivity"] = graph_connectivity(latent, labels, n_neighbors=graph_k)
        agreement = leiden_ari_nmi_best_resolution(latent, labels, n_neighbors=graph_k, seed=seed)
        scores.update(ari=agreement["ari"], nmi=agreement["nmi"], leiden_resolution=agreement["resolution"])
        scores["label_silhouette"] = label_silhouette(latent, labels)
    return scores


def check_scorable(
    adata: AnnData, *, batch_key: str, label_key: str | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Refuse columns ``integration_scores`` cannot score, from ``obs`` alone (no latent), so that a
    caller can check them before it trains the model the latent comes from. Returns the masks of
    the cells with a batch and of those with a label, (n_cells,) each (None without ``label_key``);
    cells without one (NaN) are left out of the scores that need it, with a logged warning."""
    require_obs_column(adata, batch_key, argument="batch_key")
    batched = labelled_cells(adata, batch_key, argument="batch_key")
    if label_key is None:
        return batched, None
    require_obs_column(adata, label_key, argument="label_key")
    labelled = labelled_cells(adata, label_key, argument="label_key")
    both = batched & labelled
    cells = pd.DataFrame({"batch": adata.obs[batch_key].astype(str).to_numpy()[both],
                          "label": adata.obs[label_key].astype(str).to_numpy()[both]})  # fmt: skip
    n_labels = adata.obs[label_key][labelled].astype(str).nunique()
    if not 2 <= n_labels < int(labelled.sum()):
        raise InputDataError(f"obs[{label_key!r}] has {n_labels} labels among {int(labelled.sum())} labelled cells; "
                             "the conservation scores need at least two labels and fewer labels than cells.",
                             argument="label_key")  # fmt: skip
    per_label = cells.groupby("label")["batch"].agg(["nunique", "size"])
    if not ((per_label["nunique"] > 1) & (per_label["nunique"] < per_label["size"])).any():
        raise InputDataError(f"No label of obs[{label_key!r}] has cells from two or more batches of "
                             f"obs[{batch_key!r}] (with more cells than batches), so mixing within cell types "
                             "cannot be measured; check that `label_key` holds the cell types and `batch_key` the batches.",
                             argument="label_key")  # fmt: skip
    return batched, labelled
