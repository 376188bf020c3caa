"""Figures written by the CLI and reports (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(history: Sequence[dict], path: str | Path) -> Path:
    """Per-epoch negative ELBO, reconstruction and KL (train and validation) in three panels."""
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, term, title in zip(
        axes, ("elbo_loss", "reconstruction", "kl"), ("negative ELBO", "reconstruction -log p(x|z)", "KL(q||p)")
    ):
        for split, style in (("train", "-"), ("val", "--")):
            key = f"{split}_{term}"
            if history and key in history[0]:
                ax.plot(epochs, [r[key] for r in history], style, label="validation" if split == "val" else split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    axes[0].set_ylabel("per cell")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
