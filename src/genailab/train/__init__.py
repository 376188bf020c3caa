"""Training: configuration, schedules, checkpoints and the loop."""

from genailab.train.config import TrainConfig
from genailab.train.trainer import Trainer, evaluate, load_checkpoint, resolve_device, seed_everything

__all__ = ["TrainConfig", "Trainer", "evaluate", "load_checkpoint", "resolve_device", "seed_everything"]
