"""KL schedules are pure functions with the stated shapes; early stopping counts patience."""

from __future__ import annotations

import pytest

from genailab.errors import ConfigError
from genailab.train.schedules import EarlyStopping, kl_weight


def test_linear_warmup():
    assert kl_weight(0.0, schedule="linear", warmup_epochs=10) == 0.0
    assert kl_weight(2.5, schedule="linear", warmup_epochs=10) == pytest.approx(0.25)
    assert kl_weight(10.0, schedule="linear", warmup_epochs=10) == 1.0
    assert kl_weight(50.0, schedule="linear", warmup_epochs=10) == 1.0
    assert kl_weight(0.0, schedule="linear", warmup_epochs=0) == 1.0


def test_cyclical_ramps_then_holds_each_cycle():
    kw = dict(schedule="cyclical", total_epochs=40, n_cycles=4)  # cycles of 10 epochs, ramp over 5
    assert kl_weight(0.0, **kw) == 0.0
    assert kl_weight(2.5, **kw) == pytest.approx(0.5)
    assert kl_weight(7.0, **kw) == 1.0
    assert kl_weight(10.0, **kw) == 0.0
    assert kl_weight(12.5, **kw) == pytest.approx(0.5)


def test_constant_and_unknown():
    assert kl_weight(0.0, schedule="constant") == 1.0
    with pytest.raises(ConfigError):
        kl_weight(0.0, schedule="sigmoid")


def test_early_stopping_patience_and_state():
    stopper = EarlyStopping(patience=2)
    assert [stopper.step(v, e) for e, v in enumerate([5.0, 4.0, 4.5, 4.2], 1)] == [False, False, False, True]
    assert stopper.best == 4.0 and stopper.best_epoch == 2 and stopper.stopped
    other = EarlyStopping(patience=2)
    other.load_state_dict(stopper.state_dict())
    assert other.state_dict() == stopper.state_dict() and other.stopped
    old = {k: v for k, v in stopper.state_dict().items() if k != "stopped"}  # saved before `stopped` was kept
    other.load_state_dict(old)
    assert not other.stopped


def test_one_cycle_lr_rises_linearly_then_falls_along_a_half_cosine():
    from genailab.train.schedules import one_cycle_lr

    rates = dict(start=1.0, peak=5.0, end=0.0)
    assert [one_cycle_lr(s, 100, warmup_steps=4, **rates) for s in range(5)] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert one_cycle_lr(51, 99, warmup_steps=4, **rates) == pytest.approx(2.5)  # half-way through the decay (4..98)
    assert one_cycle_lr(98, 99, warmup_steps=4, **rates) == 0.0  # the last step
    assert one_cycle_lr(0, 10, warmup_steps=0, start=1.0, peak=5.0, end=0.5) == 5.0


@pytest.mark.parametrize("total", [3, 4, 9, 10, 205, 1000])
def test_one_cycle_starts_at_lr_and_ends_at_min_lr(total):
    """The first step runs at lr (a short run too), the last at min_lr exactly, the peak in between."""
    from genailab.train.schedules import one_cycle_lr, one_cycle_warmup_steps

    warmup = one_cycle_warmup_steps(total, 0.05)
    assert 1 <= warmup < total - 1
    rates = [one_cycle_lr(s, total, warmup_steps=warmup, start=1e-3, peak=4e-3, end=1e-6) for s in range(total)]
    assert rates[0] == 1e-3 and rates[-1] == 1e-6 and max(rates) == rates[warmup] == 4e-3


def test_one_cycle_warmup_steps():
    from genailab.train.schedules import one_cycle_warmup_steps

    assert [one_cycle_warmup_steps(t, 0.05) for t in (1, 2, 4, 9, 10, 30, 205)] == [0, 1, 1, 1, 1, 2, 10]
    assert one_cycle_warmup_steps(50, 0.0) == 0  # no warm-up asked for, none given
    assert one_cycle_warmup_steps(10, 0.99) == 9  # at least one step to fall


def test_data_dependent_defaults_follow_the_training_cells():
    from genailab.train import TrainConfig

    auto = TrainConfig()
    assert [auto.resolved(n).epochs for n in (630, 4_500, 18_000, 1_000_000, 10**9, 1)] == [40, 15, 7, 2, 2, 400]
    plan = auto.resolved(4_500)
    assert plan.lr_schedule == "one_cycle" and plan.kl_warmup_epochs == pytest.approx(0.3 * 15)
    assert plan.resolved(10).epochs == 15  # resolving twice changes nothing
    given = TrainConfig(epochs=40).resolved(4_500)  # given epochs: the plateau schedule, a 10-epoch KL warm-up
    assert (given.epochs, given.lr_schedule, given.kl_warmup_epochs) == (40, "plateau", 10.0)
    assert TrainConfig(lr_schedule="plateau").resolved(4_500).lr_schedule == "plateau"


@pytest.mark.parametrize(("epochs", "warmup"), [(1, 0.3), (3, 0.9), (7, 2.1), (33, 9.9), (34, 10.0), (200, 10.0)])
def test_given_epochs_cap_the_default_kl_warmup_at_a_share_of_the_run(epochs, warmup):
    """A run too short for the 10-epoch warm-up warms up over kl_warmup_fraction of it, so it ends at KL weight 1."""
    from genailab.train import TrainConfig

    plan = TrainConfig(epochs=epochs).resolved(4_500)
    assert plan.kl_warmup_epochs == pytest.approx(warmup)
    assert kl_weight(plan.epochs, warmup_epochs=plan.kl_warmup_epochs) == 1.0
    assert TrainConfig(epochs=epochs, kl_warmup_epochs=20).resolved(4_500).kl_warmup_epochs == 20.0  # set: kept
    assert TrainConfig(epochs=epochs, kl_warmup_fraction=0.5).resolved(10).kl_warmup_epochs == pytest.approx(
        min(10.0, 0.5 * epochs))
