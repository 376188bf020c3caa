"""What the applications share at the AnnData edge: the model's counts, log-normalisation, params."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from genailab.anndata_models.base import storable_params
from genailab.errors import ConfigError, InputDataError


def require_count_model(model) -> None:
    if not model.config.is_count_model:
        raise ConfigError(
            f"This application needs a count model (nb or zinb); the model's likelihood is {model.config.likelihood!r}."
        )


def model_counts(adata: AnnData, model) -> sp.csr_matrix:
    """The counts the model reads (its layer, its genes in its order) as CSR float32, (n_cells, n_genes)."""
    require_count_model(model)
    if adata.isbacked:
        raise InputDataError("The applications need the data in memory; read the h5ad without backed='r'.")
    return model.get_expression(adata)


def record_params(adata: AnnData, key: str, params: Mapping[str, object], **results) -> None:
    """``adata.uns[key] = {'params': params, **results}`` with None values left out (h5ad cannot store None)."""
    adata.uns[key] = {"params": storable_params(params), **results}
