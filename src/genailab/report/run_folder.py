"""A training run's folder: the saved model, its per-epoch history and its training curves."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from genailab.report.figures import plot_training_curves
from genailab.safe_write import atomic_file

RUN_FILES = ("history.csv", "training_curves.png")  # written beside the model files


def write_run(model, out: str | Path) -> Path:
    """Save ``model`` into ``out`` with ``history.csv`` and ``training_curves.png``; returns ``out``.

    An existing model in ``out`` is replaced (callers check ``--overwrite`` before training). The
    model is written first, so a full disk while writing the history or the figure loses neither
    the model nor an earlier file of that name.
    """
    out = Path(out)
    model.save(out, overwrite=True)
    with atomic_file(out / "history.csv", "w") as handle:
        pd.DataFrame(model.history).to_csv(handle, index=False)
    plot_training_curves(model.history, out / "training_curves.png")
    return out
