"""Schedules as pure functions of training progress (epochs, fractional within an epoch)."""

from __future__ import annotations

import math

from genailab.errors import ConfigError

KL_SCHEDULES = ("constant", "linear", "cyclical")
LR_SCHEDULES = ("plateau", "one_cycle")


def kl_weight(
    progress: float,
    *,
    schedule: str = "linear",
    warmup_epochs: float = 10.0,
    total_epochs: float = 1.0,
    n_cycles: int = 4,
    ramp_fraction: float = 0.5,
) -> float:
    """Weight in [0, 1] multiplying beta * KL at ``progress`` epochs into training.

    - ``constant``: always 1.
    - ``linear``: rises linearly from 0 to 1 over ``warmup_epochs`` (KL warm-up), then stays 1.
    - ``cyclical``: ``n_cycles`` cycles over ``total_epochs``; each rises linearly over its first
      ``ramp_fraction`` and then stays 1 (Fu et al., 2019, "Cyclical annealing schedule").
    """
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 if warmup_epochs <= 0 else min(1.0, max(0.0, progress / warmup_epochs))
    if schedule == "cyclical":
        cycle_length = total_epochs / max(n_cycles, 1)
        phase = (progress % cycle_length) / cycle_length
        return min(1.0, phase / ramp_fraction)
    raise ConfigError(f"kl_schedule={schedule!r} is not one of {KL_SCHEDULES}.")


def one_cycle_lr(step: int, total_steps: int, *, warmup_steps: int, start: float, peak: float, end: float) -> float:
    """Learning rate of optimiser step ``step`` (0-based) of ``total_steps`` in a one-cycle schedule.

    Rises linearly from ``start`` at step 0 to ``peak`` at step ``warmup_steps`` (Adam's moment
    estimates are poor at first, and a high rate then throws the weights far), then falls along a
    half cosine to ``end`` at the last step, ``total_steps - 1`` (Smith & Topin, 2017,
    "Super-convergence"; Loshchilov & Hutter, 2017, "SGDR"): a short run at a high rate, spending
    its end refining.
    """
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    remaining = max(total_steps - warmup_steps - 1, 1)
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, remaining) / remaining))


def one_cycle_warmup_steps(total_steps: int, fraction: float) -> int:
    """Warm-up steps of a one-cycle run: ``round(fraction * total_steps)``, but at least one when
    ``fraction > 0`` and the run has two steps or more (so the first step never runs at the peak),
    and never all of them."""
    if fraction <= 0 or total_steps < 2:
        return 0
    return min(max(round(fraction * total_steps), 1), total_steps - 1)


class EarlyStopping:
    """Stop when a monitored loss has not improved by ``min_delta`` for ``patience`` epochs;
    ``stopped`` records that it did (kept in checkpoints, so a stopped run resumes to itself)."""

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience = patience
        self.min_delta = min_delta
        self.best = float("inf")
        self.best_epoch = -1
        self.bad_epochs = 0
        self.stopped = False

    def step(self, value: float, epoch: int) -> bool:
        """Record this epoch's value; True when training should stop."""
        if value < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        self.stopped = self.bad_epochs >= self.patience
        return self.stopped

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs, "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; a state saved before ``stopped`` was kept counts as not stopped."""
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
        self.stopped = bool(state.get("stopped", False))
