"""The one frozen training configuration, saved with every model."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields

from genailab.data.backed import CHUNK_ROWS, CHUNKS_IN_MEMORY
from genailab.errors import ConfigError
from genailab.train.schedules import KL_SCHEDULES

OPTIMIZERS = ("adam", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """How to fit a model; plain data so it round-trips through JSON."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6  # decoupled (AdamW) or L2 (Adam) regularisation
    optimizer: str = "adamw"
    grad_clip: float | None = 10.0  # max global gradient norm; None disables clipping
    kl_schedule: str = "linear"  # "constant", "linear" warm-up or "cyclical" annealing of beta * KL
    kl_warmup_epochs: float = 10.0  # length of the linear warm-up
    kl_cycles: int = 4  # number of cycles of the cyclical schedule
    validation_fraction: float = 0.1  # cells held out for early stopping and the LR schedule
    early_stopping_patience: int | None = 20  # epochs without validation improvement; None disables
    early_stopping_min_delta: float = 0.0
    lr_plateau_patience: int | None = 8  # epochs without improvement before lr *= lr_factor; None disables
    lr_factor: float = 0.5
    min_lr: float = 1e-6
    checkpoint_every: int = 0  # write a resumable checkpoint every N epochs (0: only the final model)
    seed: int = 0  # one seed for weights, dropout, sampling, the split and the data order
    chunk_rows: int = CHUNK_ROWS  # backed h5ad only: consecutive rows per disk read; chunk order is shuffled
    chunks_in_memory: int = CHUNKS_IN_MEMORY  # backed h5ad only: chunks held and shuffled together (the memory)
    deterministic: bool = False  # ask torch for deterministic kernels (bitwise-repeatable, maybe slower)
    device: str = "auto"  # "auto" picks CUDA when present, else CPU
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "kl_cycles", "checkpoint_every", "seed", "chunk_rows", "chunks_in_memory"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ConfigError(f"{name} must be a whole number, got {value!r}.")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}.")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs ({self.epochs}) and batch_size ({self.batch_size}) must be positive.")
        if not 0 < self.lr < float("inf"):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr}.")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r} is not one of {OPTIMIZERS}.")
        if self.kl_schedule not in KL_SCHEDULES:
            raise ConfigError(f"kl_schedule={self.kl_schedule!r} is not one of {KL_SCHEDULES}.")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}.")
        if self.chunk_rows < 1 or self.chunks_in_memory < 1:
            raise ConfigError(f"chunk_rows ({self.chunk_rows}) and chunks_in_memory ({self.chunks_in_memory}) must be positive.")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"Unknown training options {sorted(unknown)}; known options are {sorted(known)}.")
        return cls(**data)
