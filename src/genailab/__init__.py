"""genailab: conditional VAEs for gene-expression and count data, for AnnData users.

The names below load on first use (``genailab.VAE`` imports torch then), so the command line
answers ``--help`` and ``--version`` without loading the numerical stack.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("genailab")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

_EXPORTS = {
    "VAE": "genailab.anndata_models.vae",
    "PerturbationModel": "genailab.anndata_models.perturbation",
    "CVAE": "genailab.model.vae",
    "CVAE_NB": "genailab.model.vae",
    "CVAE_ZINB": "genailab.model.vae",
    "ModelConfig": "genailab.model.config",
    "TrainConfig": "genailab.train.config",
}

# subpackages reachable as attributes, as in scanpy (``genailab.apps.denoise``), also loaded on first use
_SUBPACKAGES = ("anndata_models", "apps", "data", "eval", "likelihood", "model", "perturb", "report", "train")

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"genailab.{name}")  # the import sets the attribute for later uses
    if name not in _EXPORTS:
        raise AttributeError(f"module 'genailab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBPACKAGES})
