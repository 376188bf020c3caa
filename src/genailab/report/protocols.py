"""Evaluation protocols that train models: scVI's masked-count imputation and a latent-dimension sweep.

Both take the options of a :class:`~genailab.VAE` (``model_options``: likelihood, layer, conditions,
architecture) and of :meth:`~genailab.VAE.fit` (``train_options``: epochs, batch size, seed...),
so a protocol can be repeated with exactly the settings of a model under evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from anndata import AnnData

from genailab.anndata_models.vae import VAE
from genailab.errors import ConfigError
from genailab.eval.imputation import imputation_score, mask_counts
from genailab.report.model_metrics import heldout_marginal_ll, reconstruction_error, validation_elbo

logger = logging.getLogger(__name__)


def masked_anndata(
    adata: AnnData, *, layer: str | None = None, fraction: float = 0.1, seed: int = 0
) -> tuple[AnnData, np.ndarray, np.ndarray, np.ndarray]:
    """A copy of ``adata`` with ``fraction`` of its non-zero counts hidden (set to zero).

    Parameters
    ----------
    adata
        Cells x genes with raw counts in ``layer`` (or ``X``).
    layer
        Layer holding the counts; None uses ``X``.
    fraction
        Share of the non-zero entries to hide.
    seed
        Random state of the choice (:func:`~genailab.eval.mask_counts`).

    Returns
    -------
    masked : AnnData
        The same cells, genes and ``obs``, with the masked counts (CSR float32) in ``X`` and, when
        ``layer`` is given, also in ``layers[layer]``.
    rows, cols, true_values : numpy.ndarray
        Hidden entries and their counts, (n_masked,).
    """
    counts = adata.X if layer is None else adata.layers[layer]
    masked, rows, cols, true_values = mask_counts(counts, fraction=fraction, seed=seed)
    masked = masked.astype(np.float32)
    result = AnnData(X=masked, obs=adata.obs.copy(), var=adata.var.copy())
    if layer is not None:
        result.layers[layer] = masked.copy()
    return result, rows, cols, true_values


def imputation_benchmark(
    adata: AnnData,
    *,
    fraction: float = 0.1,
    seed: int = 0,
    model_options: Mapping | None = None,
    train_options: Mapping | None = None,
) -> dict[str, float]:
    """scVI's imputation protocol end to end: mask, train on the masked counts, score the hidden ones.

    Hides ``fraction`` of the non-zero counts (:func:`masked_anndata`), fits a
    :class:`~genailab.VAE` on the masked data, predicts every entry as the denoised mean
    E[x | z = posterior mean, c] at each cell's observed (masked) library size, and reports the
    median absolute error at the hidden entries (Lopez et al., Nat. Methods 2018).

    Parameters
    ----------
    adata
        Raw counts, in ``model_options["layer"]`` or ``X``.
    fraction
        Share of non-zero entries hidden.
    seed
        Random state of the mask.
    model_options
        Keyword options of :class:`~genailab.VAE` (``likelihood``, ``layer``, ``condition_keys``,
        ``latent_dim``...); the likelihood must be ``nb`` or ``zinb``.
    train_options
        Keyword options of :meth:`~genailab.VAE.fit` (``epochs``, ``batch_size``, ``seed``...).

    Returns
    -------
    dict
        ``median_l1`` (0 is perfect), ``median_l1_zero`` (the error of predicting 0 everywhere, i.e.
        the median hidden count: the score to beat), ``n_masked`` and ``fraction``.

    Examples
    --------
    >>> imputation_benchmark(adata, model_options={"likelihood": "nb", "layer": "counts"},
    ...                      train_options={"epochs": 100})  # doctest: +SKIP
    """
    model_options = dict(model_options or {})
    if model_options.get("likelihood", "nb") == "gaussian":
        raise ConfigError("The imputation protocol hides counts; use likelihood='nb' or 'zinb'.")
    masked, rows, cols, true_values = masked_anndata(
        adata, layer=model_options.get("layer"), fraction=fraction, seed=seed
    )
    model = VAE(masked, **model_options).fit(**dict(train_options or {}))
    predicted = model.get_normalized_expression(library_size="observed")
    return {
        "median_l1": imputation_score(predicted, rows, cols, true_values=true_values),
        "median_l1_zero": float(np.median(true_values)),
        "n_masked": int(true_values.size),
        "fraction": fraction,
    }


def latent_dim_sweep(
    adata: AnnData,
    latent_dims: Sequence[int],
    *,
    model_options: Mapping | None = None,
    train_options: Mapping | None = None,
    n_samples: int = 0,
) -> list[dict[str, float]]:
    """Train one model per latent size and score each on its validation cells.

    The reconstruction error usually falls as the latent grows and then flattens; the held-out
    negative ELBO (which also pays for the KL term) turns up again once extra dimensions only
    fit noise. Pick the smallest size near the flat part.

    Parameters
    ----------
    adata
        The data, as for :class:`~genailab.VAE`.
    latent_dims
        Latent sizes to try.
    model_options
        Keyword options of :class:`~genailab.VAE` other than ``latent_dim``.
    train_options
        Keyword options of :meth:`~genailab.VAE.fit`; ``validation_fraction`` must be positive.
    n_samples
        Importance samples for the held-out marginal log-likelihood; 0 skips it.

    Returns
    -------
    list of dict
        One row per latent size, in the given order: ``latent_dim``, ``reconstruction_nll`` and
        ``reconstruction_mse`` (:func:`~genailab.report.model_metrics.reconstruction_error`),
        ``validation_reconstruction``, ``validation_kl``, ``validation_negative_elbo``
        (:func:`~genailab.report.model_metrics.validation_elbo`), ``epochs`` trained, and
        ``marginal_ll`` when ``n_samples`` > 0.
    """
    model_options = dict(model_options or {})
    if "latent_dim" in model_options:
        raise ConfigError("latent_dim is what the sweep varies; leave it out of model_options.")
    if len(latent_dims) == 0 or min(latent_dims) < 1:
        raise ConfigError(f"latent_dims must be a non-empty list of positive sizes, got {list(latent_dims)}.")
    rows = []
    for latent_dim in latent_dims:
        logger.info("latent-dimension sweep: training latent_dim=%d", latent_dim)
        model = VAE(adata, latent_dim=int(latent_dim), **model_options).fit(**dict(train_options or {}))
        reconstruction = reconstruction_error(model.adata, model)
        elbo = validation_elbo(model.adata, model)
        row = {
            "latent_dim": int(latent_dim),
            "reconstruction_nll": reconstruction["nll"],
            "reconstruction_mse": reconstruction["mse"],
            "validation_reconstruction": elbo["reconstruction"],
            "validation_kl": elbo["kl"],
            "validation_negative_elbo": elbo["negative_elbo"],
            "epochs": len(model.history),
        }
        if n_samples > 0:
            row["marginal_ll"] = heldout_marginal_ll(model.adata, model, n_samples=n_samples)["mean"]
        rows.append(row)
    return rows
