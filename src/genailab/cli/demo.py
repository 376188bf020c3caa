"""The main job on the embedded data: train, embed, cluster and score against known cell types."""

from __future__ import annotations

import json
from pathlib import Path

from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from genailab.anndata_models.vae import VAE
from genailab.data.datasets import pbmc68k_counts
from genailab.train.config import TrainConfig


def run_demo(out: str | Path, *, epochs: int = 150, seed: int = 0) -> list[str]:
    """Fit an NB model to the bundled PBMC counts and write model, embedding, UMAP and scores.

    Returns the summary lines the CLI prints. Writes under ``out``: ``model/`` (saved model,
    history.csv, training_curves.png), ``pbmc68k_genailab.h5ad`` (latent in
    ``obsm['X_genailab']``, UMAP, Leiden clusters, marker genes), ``umap.png`` and ``metrics.json``.
    """
    from genailab.apps import cluster
    from genailab.report.run_folder import write_run

    out = Path(out)
    adata = pbmc68k_counts()
    model = VAE(adata, likelihood="nb", layer="counts", latent_dim=10, hidden_dims=(128, 128))
    model.fit(TrainConfig(epochs=epochs, seed=seed, batch_size=128, kl_warmup_epochs=20))
    write_run(model, out / "model")

    cluster(adata, model, resolution=0.8, n_neighbors=15, plot=out / "umap.png", color=["cell_type"], seed=seed)
    metrics = {
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "epochs_trained": len(model.history),
        "final_validation_negative_elbo": model.history[-1].get("val_elbo_loss"),
        "leiden_clusters": int(adata.obs["leiden"].nunique()),
        "ari_vs_cell_type": float(adjusted_rand_score(adata.obs["cell_type"], adata.obs["leiden"])),
        "nmi_vs_cell_type": float(normalized_mutual_info_score(adata.obs["cell_type"], adata.obs["leiden"])),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    adata.write_h5ad(out / "pbmc68k_genailab.h5ad")
    return [
        f"Trained an NB conditional VAE on {adata.n_obs} PBMCs x {adata.n_vars} genes for {len(model.history)} epochs.",
        f"Leiden on the latent: {metrics['leiden_clusters']} clusters, ARI {metrics['ari_vs_cell_type']:.3f}, "
        f"NMI {metrics['nmi_vs_cell_type']:.3f} against the 10 known cell types.",
        f"Results in {out}: model/ (model, history.csv, training_curves.png), pbmc68k_genailab.h5ad, umap.png, metrics.json",
    ]
