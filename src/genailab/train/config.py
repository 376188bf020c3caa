"""The one frozen training configuration, saved with every model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from genailab.data.backed import CHUNK_ROWS, CHUNKS_IN_MEMORY
from genailab.checks import check_number
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
    early_stopping_patience: int | None = 20  # stop after this many epochs (>= 1) without improvement; None disables
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
        for name, rule in _NUMBERS.items():
            object.__setattr__(self, name, check_number(name, getattr(self, name), **rule))
        for name in ("deterministic", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}.", argument=name)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r} is not one of {OPTIMIZERS}.", argument="optimizer")
        if self.kl_schedule not in KL_SCHEDULES:
            raise ConfigError(f"kl_schedule={self.kl_schedule!r} is not one of {KL_SCHEDULES}.", argument="kl_schedule")
        if self.min_lr > self.lr:
            raise ConfigError(
                f"min_lr={self.min_lr:g} is above lr={self.lr:g}; the plateau schedule only lowers the learning "
                "rate, so give a min_lr at or below lr.",
                argument="min_lr",
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"Unknown training options {sorted(unknown)}; known options are {sorted(known)}.")
        return cls(**data)


# The numeric fields and their valid ranges (checked by genailab.checks.check_number).
_NUMBERS = {
    "epochs": dict(integer=True, ge=1),
    "batch_size": dict(integer=True, ge=1),
    "lr": dict(gt=0),
    "weight_decay": dict(ge=0),
    "grad_clip": dict(gt=0, allow_none=True, hint="None disables clipping."),
    "kl_warmup_epochs": dict(ge=0),
    "kl_cycles": dict(integer=True, ge=1),
    "validation_fraction": dict(ge=0, lt=1),
    "early_stopping_patience": dict(integer=True, ge=1, allow_none=True, hint="None disables early stopping."),
    "early_stopping_min_delta": dict(ge=0),
    "lr_plateau_patience": dict(integer=True, ge=0, allow_none=True, hint="None keeps the learning rate fixed."),
    "lr_factor": dict(gt=0, lt=1),
    "min_lr": dict(ge=0),
    "checkpoint_every": dict(integer=True, ge=0, hint="0 writes only the final model."),
    "seed": dict(integer=True, ge=0, le=2**32 - 1),
    "chunk_rows": dict(integer=True, ge=1),
    "chunks_in_memory": dict(integer=True, ge=1),
}
