"""Tensor-only models: configuration, network parts and the conditional VAEs."""

from genailab.model.config import ModelConfig
from genailab.model.vae import CVAE, CVAE_NB, CVAE_ZINB, ConditionalVAE, LossOutput

__all__ = ["ModelConfig", "ConditionalVAE", "CVAE", "CVAE_NB", "CVAE_ZINB", "LossOutput"]
