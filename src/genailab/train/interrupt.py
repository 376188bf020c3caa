"""Ctrl-C or SIGTERM during training: go back to the end of the last finished epoch and keep it.

:class:`LastFinishedEpoch` holds a copy of the trainer's state at the end of every epoch. If the
loop is interrupted, it restores that state (weights, optimiser, history, random state) so the
model is coherent, writes it as a resumable checkpoint when the trainer has a checkpoint path, and
lets the ``KeyboardInterrupt`` go on to the caller. While it is active, SIGTERM (as sent by
``kill`` or a batch scheduler) raises ``KeyboardInterrupt`` too, unless the program installed its
own handler.
"""

from __future__ import annotations

import copy
import logging
import signal
import threading
from pathlib import Path

logger = logging.getLogger(__name__)


class LastFinishedEpoch:
    """Context manager around a trainer's loop; call :meth:`finished` after each epoch.

    Parameters
    ----------
    trainer
        A :class:`~genailab.train.trainer.Trainer`: its ``state_dict``, ``load_state_dict``,
        ``save_checkpoint``, ``checkpoint_path``, ``history`` and ``dist`` are used.

    Attributes
    ----------
    checkpoint
        Where the interrupted run was checkpointed, or None.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.checkpoint: Path | None = None
        self._state = None
        self._previous_handler = None

    def finished(self) -> None:
        """Remember the trainer's state now, at the end of an epoch."""
        self._state = copy.deepcopy(self.trainer.state_dict())

    def __enter__(self) -> LastFinishedEpoch:
        self.finished()  # the state before the first epoch (fresh or resumed)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._previous_handler = signal.signal(signal.SIGTERM, _interrupt)
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            trainer = self.trainer
            trainer.load_state_dict(self._state)
            if trainer.checkpoint_path is not None and trainer.history and trainer.dist.is_main:
                self.checkpoint = trainer.save_checkpoint()
                logger.warning("Interrupted; epoch %d is checkpointed in %s.", len(trainer.history), self.checkpoint)
        return False


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
