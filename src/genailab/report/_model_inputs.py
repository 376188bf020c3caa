"""Cells a fitted-model metric scores, read in minibatches on the model's device, with seeded sampling."""

from __future__ import annotations

import contextlib

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData

from genailab.data.backed import minibatch_loader
from genailab.errors import ConfigError, InputDataError

_BATCH = 512


def heldout_cells(model, adata: AnnData | None = None, *, indices=None) -> tuple[AnnData, np.ndarray]:
    """The AnnData and row indices a metric scores: by default the model's validation cells."""
    if adata is None:
        adata = model.adata
        if adata is None:
            raise ConfigError("The model was loaded without an AnnData; pass adata=... explicitly.")
    if indices is None:
        indices = model.validation_indices
        if indices.size == 0:
            raise ConfigError(
                "The model was trained with validation_fraction=0, so it has no held-out cells; "
                "pass indices=... (rows of adata) to choose the cells to score."
            )
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1 or indices.size == 0 or indices.min() < 0 or indices.max() >= adata.n_obs:
        raise InputDataError(
            f"indices must be a non-empty 1-D array of rows of adata (0..{adata.n_obs - 1}); the model's "
            "validation indices refer to its training AnnData, so pass indices=... for other data."
        )
    return adata, indices


def batches(model, adata: AnnData, indices: np.ndarray):
    """Minibatches of the chosen cells in order, on the model's device."""
    matrix = model.schema.expression(adata)
    conditions = model.schema.encode_obs(adata.obs)
    device = next(model.module.parameters()).device
    for batch in minibatch_loader(matrix, conditions, indices=indices, batch_size=_BATCH, shuffle=False):
        yield batch.to(device)


def observed(model, adata: AnnData, indices: np.ndarray) -> sp.csr_matrix | np.ndarray:
    """The modelled values (layer) of the chosen cells: CSR float64 for count models, else dense."""
    rows = [batch.x.cpu().numpy().astype(np.float64) for batch in batches(model, adata, indices)]
    return sp.csr_matrix(np.concatenate(rows)) if model.config.is_count_model else np.concatenate(rows)


@contextlib.contextmanager
def seeded(model, seed: int):
    """Seed torch's generators for the model's sampling, leaving the caller's random streams as they were."""
    device = next(model.module.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
