"""A training run's folder: the saved model, its per-epoch history and its training curves."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from genailab.report.figures import plot_training_curves


def write_run(model, out: str | Path) -> Path:
    """Save ``model`` into ``out`` with ``history.csv`` and ``training_curves.png``; returns ``out``."""
    out = Path(out)
    model.save(out, overwrite=True)
    pd.DataFrame(model.history).to_csv(out / "history.csv", index=False)
    plot_training_curves(model.history, out / "training_curves.png")
    return out
