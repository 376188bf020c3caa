"""Denoising: replace noisy counts by the model's expected expression, and score it against a truth."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from genailab.apps._anndata import check_key_added, model_counts, record_params
from genailab.data.preprocess import log_normalize
from genailab.checks import check_library_size, check_number
from genailab.errors import InputDataError


def denoise(
    adata: AnnData,
    model,
    *,
    key_added: str = "genailab_denoised",
    library_size: float | str = "observed",
    include_dropout: bool = False,
    conditions: Mapping[str, object] | None = None,
    n_samples: int = 1,
) -> None:
    """Write the model's expected expression of every cell to ``adata.layers[key_added]``.

    For a count model this is the decoder's NB mean, ``proportions(z, c) * library``, with z the
    posterior mean of the cell (or an average over ``n_samples`` posterior draws). For ZINB the
    technical dropout is left out unless ``include_dropout`` (then the mean is ``(1 - pi) * mu``).

    Parameters
    ----------
    adata
        Cells x genes with the model's layer, genes and condition columns.
    model
        A trained :class:`~genailab.VAE`.
    key_added
        Layer to write; ``uns[key_added]['params']`` records the options.
    library_size
        ``"observed"`` (each cell's own total: denoised counts on the scale of the data) or a
        number (every cell at that total, e.g. ``1e4`` for denoised counts per 10k).
    include_dropout
        ZINB only: multiply by the probability of not dropping out.
    conditions
        Decode every cell under these conditions instead of its own (e.g. ``{"batch": "b0"}``).
    n_samples
        Posterior draws of z averaged; 1 decodes the posterior mean.

    Returns
    -------
    Nothing; sets ``adata.layers[key_added]`` (dense float32, cells x the model's genes, which must
    be all of ``adata``'s genes in order) and ``adata.uns[key_added]['params']``.

    Examples
    --------
    >>> denoise(adata, model, library_size=1e4)  # doctest: +SKIP
    >>> adata.layers["genailab_denoised"].shape  # doctest: +SKIP
    (600, 200)
    """
    check_library_size(library_size, observed=True)
    check_number("n_samples", n_samples, integer=True, ge=1)
    check_key_added(key_added, model, where="layers")
    if list(model.schema.gene_names) != list(map(str, adata.var_names)):
        raise InputDataError(
            "A layer needs the model's genes in the model's order; subset the data first, "
            "e.g. adata = adata[:, list(model.schema.gene_names)].copy()."
        )
    adata.layers[key_added] = model.get_normalized_expression(
        adata, library_size=library_size, conditions=conditions, n_samples=n_samples, include_dropout=include_dropout
    )
    record_params(
        adata, key_added,
        dict(library_size=library_size, include_dropout=include_dropout, conditions=conditions, n_samples=n_samples),
    )  # fmt: skip


def denoising_error(
    adata: AnnData, model, *, denoised: str = "genailab_denoised", truth: str = "true_mean"
) -> pd.DataFrame:
    """Error of denoised expression and of two baselines to the true means, each on a fair scale.

    Every method's rows are rescaled to one total, so that only the shape of expression across
    genes is compared (the truth's own library size is not observable):

    * ``counts``: at each cell's observed total; the baseline is the raw counts;
    * ``log_cp10k``: ``log1p`` of counts per 10,000; the baseline is the library-size-normalised
      counts (``sc.pp.normalize_total`` + ``sc.pp.log1p``).

    On both scales the raw and the library-normalised counts are the same numbers rescaled, so
    one baseline row covers both.

    Parameters
    ----------
    adata
        Cells x genes with the model's count layer, ``layers[denoised]`` (from :func:`denoise`) and
        ``layers[truth]`` (true means, e.g. from :func:`genailab.data.simulate`).
    model
        The model whose layer holds the observed counts.
    denoised, truth
        Layers to compare.

    Returns
    -------
    DataFrame with one row per ``(scale, method)`` (methods ``observed`` and ``genailab``) and
    columns ``mae``, ``rmse`` and ``pearson`` (over all entries).
    """
    for argument, layer in (("denoised", denoised), ("truth", truth)):
        if layer not in adata.layers:
            raise InputDataError(f"{argument}={layer!r} is not in adata.layers (available: {list(adata.layers)}); "
                                 "run denoise() first, or name the layer.", argument=argument)  # fmt: skip
    counts = model_counts(adata, model).toarray()
    total = counts.sum(axis=1, keepdims=True)
    methods = {"observed": counts, "genailab": np.asarray(adata.layers[denoised], dtype=np.float64)}
    truth_matrix = adata.layers[truth]
    truth_matrix = truth_matrix.toarray() if sp.issparse(truth_matrix) else np.asarray(truth_matrix, dtype=np.float64)
    rows = []
    for scale, rescale in (
        ("counts", lambda m: _per_cell(m, total)),
        ("log_cp10k", lambda m: log_normalize(m)),
    ):
        target = rescale(truth_matrix)
        for method, values in methods.items():
            diff = rescale(values) - target
            rows.append({
                "scale": scale, "method": method, "mae": float(np.mean(np.abs(diff))),
                "rmse": float(np.sqrt(np.mean(diff**2))),
                "pearson": float(np.corrcoef(rescale(values).ravel(), target.ravel())[0, 1]),
            })  # fmt: skip
    return pd.DataFrame(rows).set_index(["scale", "method"])


def _per_cell(matrix: np.ndarray, total) -> np.ndarray:
    """Rows of ``matrix`` rescaled to sum to ``total`` (a number or a column of totals)."""
    sums = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix * total, sums, out=np.zeros_like(matrix, dtype=np.float64), where=sums > 0)
