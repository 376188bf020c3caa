"""Encode conditions and decode latent points through a trained VAE, in minibatches."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from genailab.errors import ConfigError

_BATCH = 1024


def encode_conditions(model, obs: pd.DataFrame, overrides: Mapping[str, object] | None = None) -> np.ndarray | None:
    """The model's condition matrix for cells with ``obs``, some conditions replaced by one value for all."""
    overrides = dict(overrides or {})
    keys = list(model.schema.categorical_keys + model.schema.continuous_keys)
    unknown = sorted(set(overrides) - set(keys))
    if unknown:
        raise ConfigError(f"Unknown condition keys {unknown}; the model's conditions are {keys}.")
    frame = pd.DataFrame(index=obs.index)
    for key in keys:
        frame[key] = overrides[key] if key in overrides else obs[key].to_numpy() if key in obs else None
    missing = [key for key in keys if frame[key].isna().all()]
    if missing:
        raise ConfigError(
            f"No values for the model's conditions {missing}; give them, e.g. conditions={{{missing[0]!r}: ...}}."
        )
    return model.schema.encode_obs(frame)


@torch.no_grad()
def decode(
    model,
    z: np.ndarray,
    conditions: np.ndarray | None,
    library: np.ndarray,
    *,
    sample: bool = False,
    include_dropout: bool = False,
) -> np.ndarray:
    """Expected expression E[x|z,c] (or, with ``sample``, counts drawn from p(x|z,c)) at ``library``.

    ``z`` is (n, latent_dim), ``conditions`` (n, raw_condition_dim) or None, ``library`` (n,) totals;
    returns (n, n_genes) float32. Draws use torch's global random state.
    """
    module = model.module.eval()
    device = next(module.parameters()).device
    out = []
    for start in range(0, z.shape[0], _BATCH):
        rows = slice(start, start + _BATCH)
        z_batch = torch.as_tensor(z[rows], dtype=torch.float32, device=device)
        c_batch = None if conditions is None else torch.as_tensor(conditions[rows], device=device)
        lib_batch = torch.as_tensor(np.asarray(library[rows], dtype=np.float32)[:, None], device=device)
        if sample:
            values = module.decode(z_batch, c_batch, lib_batch).sample()
        else:
            values = module.expected_expression(z_batch, c_batch, lib_batch, include_dropout=include_dropout)
        out.append(values.cpu().numpy())
    return np.concatenate(out).astype(np.float32, copy=False)
