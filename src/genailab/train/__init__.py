"""Training: configuration, schedules, checkpoints and the loop."""

from genailab.train.config import TrainConfig
from genailab.train.trainer import Trainer, elbo_terms, load_checkpoint, resolve_device, seed_everything

__all__ = ["TrainConfig", "Trainer", "elbo_terms", "load_checkpoint", "resolve_device", "seed_everything"]
