"""The main job on the embedded data: train, embed, cluster and score against known cell types."""

from __future__ import annotations

import json
from pathlib import Path

from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from genailab.anndata_vae import VAE
from genailab.data.datasets import pbmc68k_counts
from genailab.train.config import TrainConfig


def run_demo(out: str | Path, *, epochs: int = 150, seed: int = 0) -> list[str]:
    """Fit an NB model to the bundled PBMC counts and write model, embedding, UMAP and scores.

    Returns the summary lines the CLI prints. Writes under ``out``: ``model/`` (saved model,
    history.csv, training_curves.png), ``pbmc68k_genailab.h5ad`` (latent in
    ``obsm['X_genailab']``, UMAP, Leiden clusters), ``umap.png`` and ``metrics.json``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    from genailab.cli.core import write_run

    out = Path(out)
    adata = pbmc68k_counts()
    model = VAE(adata, likelihood="nb", layer="counts", latent_dim=10, hidden_dims=(128, 128))
    model.fit(TrainConfig(epochs=epochs, seed=seed, batch_size=128, kl_warmup_epochs=20))
    write_run(model, out / "model")

    adata.obsm["X_genailab"] = model.get_latent()
    sc.pp.neighbors(adata, use_rep="X_genailab", n_neighbors=15, random_state=seed)
    sc.tl.umap(adata, random_state=seed)
    sc.tl.leiden(adata, resolution=0.8, random_state=seed, key_added="leiden", flavor="igraph", n_iterations=2,
                 directed=False)
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
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    sc.pl.umap(adata, color="cell_type", ax=axes[0], show=False, title="genailab latent: cell type")
    sc.pl.umap(adata, color="leiden", ax=axes[1], show=False, title="Leiden clusters", legend_loc="on data")
    fig.tight_layout()
    fig.savefig(out / "umap.png", dpi=110)
    plt.close(fig)
    adata.write_h5ad(out / "pbmc68k_genailab.h5ad")
    return [
        f"Trained an NB conditional VAE on {adata.n_obs} PBMCs x {adata.n_vars} genes for {len(model.history)} epochs.",
        f"Leiden on the latent: {metrics['leiden_clusters']} clusters, ARI {metrics['ari_vs_cell_type']:.3f}, "
        f"NMI {metrics['nmi_vs_cell_type']:.3f} against the 10 known cell types.",
        f"Results in {out}: model/ (model, history.csv, training_curves.png), pbmc68k_genailab.h5ad, umap.png, metrics.json",
    ]
