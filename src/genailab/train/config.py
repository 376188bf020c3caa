"""The one frozen training configuration, saved with every model."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from genailab.checks import check_number
from genailab.errors import ConfigError
from genailab.train.schedules import KL_SCHEDULES, LR_SCHEDULES

OPTIMIZERS = ("adam", "adamw")
MOVED_TO_LOADER = ("chunk_rows", "chunks_in_memory")  # saved by earlier versions; now LoaderOptions (not training)
PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """How to fit a model; plain data so it round-trips through JSON."""

    MOVED_OPTIONS = MOVED_TO_LOADER  # class attribute, not a field: accepted (and ignored) in saved descriptions

    epochs: int | None = None  # None: chosen from the number of training cells (see resolved())
    auto_epoch_scale: float = 1000.0  # epochs=None: round(scale / sqrt(training cells)) in [2, 400]: 15 at 4,500 cells, 2 at 1M
    batch_size: int = 128
    lr: float = 1e-3  # the first learning rate (the plateau schedule lowers it, the one-cycle one raises it first)
    lr_schedule: str | None = None  # "one_cycle" or "plateau"; None: one-cycle when epochs=None, else plateau
    one_cycle_peak: float = 4.0  # one-cycle: lr rises to this multiple of lr, then falls to min_lr along a half cosine
    lr_warmup_fraction: float = 0.05  # one-cycle: share of the run's steps over which lr rises to its peak (at least one step when > 0)
    weight_decay: float = 1e-6  # decoupled (AdamW) or L2 (Adam) regularisation
    optimizer: str = "adamw"
    grad_clip: float | None = 10.0  # max global gradient norm; None disables clipping
    kl_schedule: str = "linear"  # "constant", "linear" warm-up or "cyclical" annealing of beta * KL
    kl_warmup_epochs: float | None = None  # linear warm-up; None: kl_warmup_fraction of the run when epochs=None, else 10 (or that share of a shorter run)
    kl_warmup_fraction: float = 0.3  # share of the run for the KL warm-up (epochs=None, or a run too short for 10 epochs)
    kl_cycles: int = 4  # number of cycles of the cyclical schedule
    validation_fraction: float = 0.1  # cells held out for early stopping and the LR schedule
    early_stopping_patience: int | None = 20  # stop after this many epochs (>= 1) without improvement; None disables
    early_stopping_min_delta: float = 0.0
    lr_plateau_patience: int | None = 8  # lr *= lr_factor after more than this many epochs in a row without a 1e-4 relative improvement; None disables
    lr_factor: float = 0.5
    min_lr: float = 1e-6
    recalibrate_norm: bool = True  # after training, recompute batch-norm statistics from the training cells
    checkpoint_every: int = 0  # write a resumable checkpoint every N epochs (0: only the final model)
    seed: int = 0  # one seed for weights, dropout, sampling, the split and the data order
    deterministic: bool = False  # deterministic kernels (maybe slower); bitwise repeats need the same seed, thread count, hardware, torch build
    device: str = "auto"  # "auto" picks CUDA when present, else CPU
    precision: str = "float32"  # "bfloat16": autocast the networks on CUDA (the likelihood stays float32)
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        for name, rule in _NUMBERS.items():
            object.__setattr__(self, name, check_number(name, getattr(self, name), **rule))
        for name in ("deterministic", "progress", "recalibrate_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}.", argument=name)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r} is not one of {OPTIMIZERS}.", argument="optimizer")
        if self.kl_schedule not in KL_SCHEDULES:
            raise ConfigError(f"kl_schedule={self.kl_schedule!r} is not one of {KL_SCHEDULES}.", argument="kl_schedule")
        if self.lr_schedule not in (None, *LR_SCHEDULES):
            raise ConfigError(f"lr_schedule={self.lr_schedule!r} is not one of {LR_SCHEDULES} (or None).", argument="lr_schedule")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is not one of {PRECISIONS}.", argument="precision")
        if self.min_lr > self.lr and self.min_lr == TrainConfig.min_lr:  # the default floor: lr is what is off
            raise ConfigError(
                f"lr={self.lr:g} is below the learning-rate floor min_lr={self.min_lr:g}; give lr >= {self.min_lr:g}.",
                argument="lr",
            )
        if self.min_lr > self.lr:
            raise ConfigError(
                f"min_lr={self.min_lr:g} is above lr={self.lr:g}; the plateau schedule only lowers the learning "
                "rate, so give a min_lr at or below lr.",
                argument="min_lr",
            )

    @property
    def lr_schedule_used(self) -> str:
        """``lr_schedule``, or its default: one-cycle when the epochs are chosen from the data, else plateau."""
        return self.lr_schedule or ("one_cycle" if self.epochs is None else "plateau")

    def resolved(self, n_train_cells: int) -> TrainConfig:
        """This configuration with the data-dependent defaults filled in for ``n_train_cells``
        training cells (what the trainer runs, and what a fitted model records).

        With ``epochs=None``: ``round(auto_epoch_scale / sqrt(n))`` epochs within [2, 400] (the
        steps a VAE needs grow much more slowly than the data: about 40 epochs at 630 cells, 15 at
        4,500, 7 at 18,000, 2 at a million; twice these epochs gained 1.5-4.4 nats of held-out
        log-likelihood on 4,050 and 16,200 simulated cells, 10 on 567 PBMCs), the one-cycle
        learning-rate schedule (the run's length is known) and a KL warm-up over
        ``kl_warmup_fraction`` of it. With given epochs: the plateau schedule and a 10-epoch KL
        warm-up, cut to ``kl_warmup_fraction`` of a run too short for it (:meth:`short_run_warmup`),
        so that every run ends on the full ELBO. Explicit values are kept.
        """
        auto = self.epochs is None
        epochs = self.epochs if not auto else int(min(max(round(self.auto_epoch_scale / math.sqrt(max(n_train_cells, 1))), 2), 400))
        plan = replace(self, epochs=epochs, lr_schedule=self.lr_schedule_used)
        warmup = self.kl_warmup_epochs
        if warmup is None:
            warmup = self.kl_warmup_fraction * epochs if auto else plan.short_run_warmup(10.0)
        return replace(plan, kl_warmup_epochs=float(warmup))

    def short_run_warmup(self, warmup_epochs: float) -> float:
        """``warmup_epochs``, or ``kl_warmup_fraction`` of the run when that is shorter: the rule for
        the default KL warm-up with given epochs and for the batch adversary's (``epochs`` resolved)."""
        return min(warmup_epochs, self.kl_warmup_fraction * self.epochs)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        data = {k: v for k, v in data.items() if k not in MOVED_TO_LOADER}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"Unknown training options {sorted(unknown)}; known options are {sorted(known)}.")
        return cls(**data)


# The numeric fields and their valid ranges (checked by genailab.checks.check_number).
_NUMBERS = {
    "epochs": dict(integer=True, ge=1, allow_none=True, hint="Leave `epochs` unset (None) to choose it from the data size."),
    "auto_epoch_scale": dict(gt=0),
    "lr_warmup_fraction": dict(ge=0, lt=1),
    "kl_warmup_fraction": dict(ge=0, le=1),
    "batch_size": dict(integer=True, ge=1),
    "lr": dict(gt=0),
    "one_cycle_peak": dict(ge=1),
    "weight_decay": dict(ge=0),
    "grad_clip": dict(gt=0, allow_none=True, hint="None disables clipping."),
    "kl_warmup_epochs": dict(ge=0, allow_none=True, hint="None: a share of the run (epochs=None) or 10 epochs at most."),
    "kl_cycles": dict(integer=True, ge=1),
    "validation_fraction": dict(ge=0, lt=1),
    "early_stopping_patience": dict(integer=True, ge=1, allow_none=True, hint="None disables early stopping."),
    "early_stopping_min_delta": dict(ge=0),
    "lr_plateau_patience": dict(integer=True, ge=0, allow_none=True, hint="None keeps the learning rate fixed."),
    "lr_factor": dict(gt=0, lt=1),
    "min_lr": dict(ge=0),
    "checkpoint_every": dict(integer=True, ge=0, hint="0 writes only the final model."),
    "seed": dict(integer=True, ge=0, le=2**32 - 1),
}
