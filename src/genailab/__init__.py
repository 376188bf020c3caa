"""genailab: conditional VAEs for gene-expression and count data, for AnnData users."""

from importlib.metadata import PackageNotFoundError, version

from genailab.anndata_models.vae import VAE
from genailab.model.config import ModelConfig
from genailab.model.vae import CVAE, CVAE_NB, CVAE_ZINB
from genailab.train.config import TrainConfig

try:
    __version__ = version("genailab")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["VAE", "CVAE", "CVAE_NB", "CVAE_ZINB", "ModelConfig", "TrainConfig", "__version__"]
