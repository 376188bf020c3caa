"""What the applications share at the AnnData edge: the model's counts, log-normalisation, params."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from genailab.anndata_models.base import storable_params
from genailab.errors import ConfigError, InputDataError

logger = logging.getLogger(__name__)


def require_count_model(model) -> None:
    if not model.config.is_count_model:
        raise ConfigError(
            f"This application needs a count model (nb or zinb); the model's likelihood is {model.config.likelihood!r}."
        )


def require_in_memory(adata: AnnData, what: str) -> None:
    """Refuse a backed AnnData before ``what`` (an application's name) writes anything into it."""
    if adata.isbacked:
        raise InputDataError(f"{what} needs the data in memory; read the h5ad without backed='r' (or "
                             "adata.to_memory()). denoise, integrate and differential_expression run on backed data.")


def key_or_keys(value: str | Sequence[str]) -> list[str]:
    """A list of obs keys from one key or several (scanpy's ``color="cell_type"`` convention)."""
    return [value] if isinstance(value, str) else list(value)


def check_key_added(key_added, model, *, where: str, argument: str = "key_added") -> str:
    """``key_added`` as a name an h5ad can store that does not overwrite what ``model`` reads (its
    layer or condition columns); ``where`` names the AnnData field, e.g. ``"layers"``, and
    ``argument`` the argument that gave it."""
    if not isinstance(key_added, str) or not key_added.strip():
        raise ConfigError(f"`{argument}` must be a non-empty name for adata.{where}, got {key_added!r}.",
                          argument=argument)
    if "/" in key_added:  # h5ad reads '/' as a group separator: the file would not read back
        raise ConfigError(f"{argument}={key_added!r} contains '/', which an h5ad file cannot store in a name; "
                          f"use another character, e.g. {key_added.replace('/', '_')!r}.", argument=argument)
    if model is not None and where == "layers" and key_added == model.schema.layer:
        raise ConfigError(f"{argument}={key_added!r} is the layer the model reads; choose another name.",
                          argument=argument)
    if model is not None and where == "obs" and key_added in model.condition_keys:
        raise ConfigError(f"{argument}={key_added!r} is a condition the model reads; choose another name.",
                          argument=argument)
    return key_added


def model_counts(adata: AnnData, model) -> sp.csr_matrix:
    """The counts the model reads (its layer, its genes in its order) as CSR float32, (n_cells, n_genes)."""
    require_count_model(model)
    require_in_memory(adata, "This application")
    return model.get_expression(adata)


def record_params(adata: AnnData, key: str, params: Mapping[str, object], **results) -> None:
    """``adata.uns[key] = {'params': params, **results}`` with None values left out (h5ad cannot store None)."""
    adata.uns[key] = {"params": storable_params(params), **results}


def require_obs_column(adata: AnnData, key: str, *, argument: str) -> str:
    """``key`` when it is a column of ``adata.obs``; otherwise an error naming ``argument``."""
    if key not in adata.obs:
        raise InputDataError(f"obs has no column {key!r} (given as `{argument}`); choose one of "
                             f"{list(adata.obs.columns)}.", argument=argument)  # fmt: skip
    return key


def labelled_cells(adata: AnnData, key: str, *, argument: str = "labels_key") -> np.ndarray:
    """Boolean mask (n_cells,) of the cells with a value in ``obs[key]``; the others (NaN) are left
    out of label scores with a logged warning, never scored as a label called "nan"."""
    known = adata.obs[key].notna().to_numpy()
    if not known.any():
        raise InputDataError(f"obs[{key!r}] has no value in any cell; pass a column with labels as {argument}.",
                             argument=argument)
    if not known.all():
        logger.warning("%d of %d cells have no %r (NaN) and are left out of the scores that use it.",
                       int((~known).sum()), known.size, key)
    return known
