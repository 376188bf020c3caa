"""The cells a fitted-model metric scores (by default the model's validation cells) and their values."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from genailab.errors import ConfigError, InputDataError

def heldout_cells(adata: AnnData, model, *, indices=None) -> tuple[AnnData, np.ndarray]:
    """The AnnData and row indices a metric scores: by default the model's validation cells."""
    if adata is None:
        raise ConfigError("Pass the AnnData to score (the training AnnData for the model's validation cells).")
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


def observed(model, adata: AnnData, indices: np.ndarray) -> sp.csr_matrix | np.ndarray:
    """The modelled values (layer) of the chosen cells: CSR float64 for count models, else dense."""
    values = model.get_expression(adata, indices=indices)
    return values.astype(np.float64)
