"""Figures of an evaluation report; each writes one PNG and closes its figure.

The user's matplotlib backend is left as it is (a notebook keeps showing its own figures); with no
display matplotlib falls back to a file-only backend by itself, and the CLI asks for one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from genailab.safe_write import atomic_file

_DPI = 110


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` atomically (never through a link, no empty file on a full disk)."""
    path = Path(path)
    fig.tight_layout()
    try:
        with atomic_file(path) as handle:
            fig.savefig(handle, format=path.suffix.lstrip(".") or "png", dpi=_DPI)
    finally:
        plt.close(fig)
    return path


def plot_latent_umap(adata, columns: Sequence[str], path: str | Path) -> Path:
    """scanpy's UMAP plot (``sc.pl.umap``) of ``adata``, one panel per ``obs`` column, legend beside each.

    ``adata`` holds ``obsm['X_umap']``; with no columns one uncoloured panel is drawn.
    """
    import scanpy as sc

    panels = list(columns) or [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5), squeeze=False)
    for ax, column in zip(axes[0], panels):
        sc.pl.umap(adata, color=column, ax=ax, show=False, title=f"latent UMAP: {column or 'all cells'}",
                   legend_fontsize=8, frameon=False)  # fmt: skip
    return _save(fig, path)


def plot_latent_sweep(rows: Sequence[Mapping], path: str | Path) -> Path:
    """Reconstruction error and held-out negative ELBO against the latent size."""
    dims = [r["latent_dim"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in (
        (axes[0], "reconstruction_mse", "reconstruction error (MSE, log1p scale)"),
        (axes[1], "validation_negative_elbo", "held-out negative ELBO per cell"),
    ):
        ax.plot(dims, [r[key] for r in rows], "o-")
        ax.set_xlabel("latent dimensions")
        ax.set_title(title)
        ax.set_xticks(dims)
    return _save(fig, path)


def plot_gene_agreement(
    path: str | Path,
    *,
    real_mean: np.ndarray,
    generated_mean: np.ndarray,
    real_zeros: np.ndarray,
    generated_zeros: np.ndarray,
    observed_cv: np.ndarray,
    replicated_cv: np.ndarray,
) -> Path:
    """Per-gene scatter plots against the diagonal: generated vs real mean (log scale) and zero
    fraction, and the posterior predictive coefficient of variation vs the observed one."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.3))
    panels = (
        (real_mean, generated_mean, "gene mean", "real (held-out)", "generated", True),
        (real_zeros, generated_zeros, "zero fraction", "real (held-out)", "generated", False),
        (observed_cv, replicated_cv, "coefficient of variation", "observed", "posterior predictive", False),
    )
    for ax, (x, y, title, xlabel, ylabel, log) in zip(axes, panels):
        keep = np.isfinite(x) & np.isfinite(y) & ((x > 0) & (y > 0) if log else True)
        x, y = x[keep], y[keep]
        ax.scatter(x, y, s=6, alpha=0.6, linewidths=0)
        if x.size:
            low, high = min(x.min(), y.min()), max(x.max(), y.max())
            ax.plot([low, high], [low, high], "k--", linewidth=0.8)
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_title(f"{title} per gene")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    return _save(fig, path)


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
    return _save(fig, path)
