"""Likelihood metrics of a fitted :class:`~genailab.VAE` on held-out cells: :func:`validation_elbo`
(negative ELBO and its terms), :func:`heldout_marginal_ll` (importance-sampled log p(x|c), the IWAE
bound) and :func:`reconstruction_error`. Generated cells are scored in
:mod:`~genailab.report.model_generation`.

Every function takes ``(adata, model, *, indices=None, ...)``, AnnData first as in
:mod:`genailab.apps`; with the model's training AnnData, ``indices`` defaults to its validation cells
(``model.validation_indices``, never used for gradient steps), so the defaults score held-out
cells. Pass ``indices=np.arange(adata.n_obs)`` to score every cell of another AnnData.
"""

from __future__ import annotations

from anndata import AnnData

from genailab.report._model_inputs import heldout_cells


def validation_elbo(adata: AnnData, model, *, indices=None, seed: int = 0) -> dict[str, float]:
    """Negative ELBO per cell on held-out cells, with its two terms (KL weight 1, one sample of z).

    The quantity of ``model.history``'s ``val_elbo_loss`` (also at KL weight 1), scored on the
    final model: the history's last value comes before the batch-norm statistics are recomputed at
    the end of the fit (``TrainConfig.recalibrate_norm``), so it is usually higher. Lower is better.

    Parameters
    ----------
    adata
        Cells to score (the training AnnData for its validation cells).
    model
        A fitted :class:`~genailab.VAE`.
    indices
        Rows of ``adata`` to score; default ``model.validation_indices``.
    seed
        Random state of the single posterior sample.

    Returns
    -------
    dict
        ``reconstruction`` (mean over cells of -log p(x|z,c)), ``kl`` (mean KL(q(z|x,c) || p(z))),
        ``negative_elbo`` (their sum) and ``n_cells``.
    """
    adata, indices = heldout_cells(adata, model, indices=indices)
    terms = model.get_elbo(adata, indices=indices, seed=seed)
    return {
        "reconstruction": terms["reconstruction"],
        "kl": terms["kl"],
        "negative_elbo": terms["elbo_loss"],
        "n_cells": int(indices.size),
    }


def heldout_marginal_ll(
    adata: AnnData, model, *, n_samples: int = 100, indices=None, seed: int = 0
) -> dict:
    """Held-out log-likelihood log p(x|c) per cell by importance sampling (IWAE bound, K samples).

    A lower bound that tightens as ``n_samples`` grows (K = 1 is the ELBO); higher is better.
    Compare models on the same cells with the same K.

    Parameters
    ----------
    adata
        Cells to score (the training AnnData for its validation cells).
    model
        A fitted :class:`~genailab.VAE`.
    n_samples
        Importance samples K per cell.
    indices
        Rows of ``adata``; default ``model.validation_indices``.
    seed
        Random state of the importance samples.

    Returns
    -------
    dict
        ``mean`` (float, per cell), ``per_cell`` ((n_cells,) array), ``n_samples`` and ``n_cells``.
    """
    adata, indices = heldout_cells(adata, model, indices=indices)
    per_cell = model.get_marginal_ll(adata, n_samples=n_samples, indices=indices, seed=seed)
    return {"mean": float(per_cell.mean()), "per_cell": per_cell, "n_samples": n_samples, "n_cells": int(indices.size)}


def reconstruction_error(adata: AnnData, model, *, indices=None) -> dict[str, float]:
    """How well each cell is reconstructed from its posterior mean, deterministically.

    Parameters
    ----------
    adata
        Cells to score (the training AnnData for its validation cells).
    model
        A fitted :class:`~genailab.VAE`.
    indices
        Rows of ``adata``; default ``model.validation_indices``.

    Returns
    -------
    dict
        ``nll``: mean over cells of -log p(x | z = E[z|x,c], c), summed over genes (count models
        at the cell's observed library size); ``mse``: mean over cells and genes of the squared
        difference between the observed and expected values, on the log1p scale for count models
        (``log1p(x)`` vs ``log1p(E[x|z,c])``) and as is for the Gaussian model; ``n_cells``.
    """
    adata, indices = heldout_cells(adata, model, indices=indices)
    return model.get_reconstruction_error(adata, indices=indices)
