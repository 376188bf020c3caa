"""The cells a fitted-model metric scores (by default the model's validation cells) and their values."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from genailab.data.loader import row_indices
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
        training = getattr(model, "adata", None)
        if training is not None and adata is not training and not adata.obs_names.equals(training.obs_names):
            raise InputDataError(  # positions into other cells would score training cells as held out
                "The model's validation cells are row positions of its training AnnData, and this AnnData holds "
                "other cells or the same in another order; pass the training AnnData, or indices=... (rows of "
                "this adata) to choose the cells to score."
            )
    try:
        indices = row_indices(indices, adata.n_obs)
    except ConfigError as exc:
        raise InputDataError(f"{exc} The model's validation indices refer to its training AnnData, so pass "
                             "indices=... for other data.") from exc
    if indices.size == 0:
        raise InputDataError("`indices` selects no cell; pass at least one row of adata.")
    return adata, indices


def observed(model, adata: AnnData, indices: np.ndarray) -> sp.csr_matrix | np.ndarray:
    """The modelled values (layer) of the chosen cells: CSR float64 for count models, else dense."""
    values = model.get_expression(adata, indices=indices)
    return values.astype(np.float64)
