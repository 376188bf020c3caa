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
