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
    assert stopper.best == 4.0 and stopper.best_epoch == 2
    other = EarlyStopping(patience=2)
    other.load_state_dict(stopper.state_dict())
    assert other.state_dict() == stopper.state_dict()


def test_one_cycle_lr_rises_linearly_then_falls_along_a_half_cosine():
    from genailab.train.schedules import one_cycle_lr

    rates = dict(start=1.0, peak=5.0, end=0.0)
    assert [one_cycle_lr(s, 100, warmup_steps=4, **rates) for s in range(4)] == [2.0, 3.0, 4.0, 5.0]
    assert one_cycle_lr(4, 100, warmup_steps=4, **rates) == 5.0
    assert one_cycle_lr(52, 100, warmup_steps=4, **rates) == pytest.approx(2.5)  # half-way through the decay
    assert one_cycle_lr(100, 100, warmup_steps=4, **rates) == pytest.approx(0.0, abs=1e-12)
    assert one_cycle_lr(0, 10, warmup_steps=0, start=1.0, peak=5.0, end=0.5) == 5.0


def test_data_dependent_defaults_follow_the_training_cells():
    from genailab.train import TrainConfig

    auto = TrainConfig()
    assert [auto.resolved(n).epochs for n in (630, 4_500, 18_000, 1_000_000, 10**9, 1)] == [40, 15, 7, 2, 2, 400]
    plan = auto.resolved(4_500)
    assert plan.lr_schedule == "one_cycle" and plan.kl_warmup_epochs == pytest.approx(0.3 * 15)
    assert plan.resolved(10).epochs == 15  # resolving twice changes nothing
    given = TrainConfig(epochs=7).resolved(4_500)  # given epochs keep the earlier defaults
    assert (given.epochs, given.lr_schedule, given.kl_warmup_epochs) == (7, "plateau", 10.0)
    assert TrainConfig(lr_schedule="plateau").resolved(4_500).lr_schedule == "plateau"
