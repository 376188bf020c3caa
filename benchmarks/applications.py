"""Quality of the five applications (issue 5) against known truth: simulated data and the embedded PBMCs.

1. Denoising: error to the simulator's true means of held-out cells, vs the raw counts and the
   library-size-normalised counts.
2. Augmentation: fidelity of generated cells to held-out real cells of the same type (prior and
   aggregate posterior), and whether generated cells of a rare type help a logistic-regression
   cell-type classifier on held-out cells.
3. Batch correction: batch mixing and cell-type conservation without batch information, with a
   batch-conditioned VAE, and with the adversary as well.
4. Cell-type discovery on pbmc68k: ARI/NMI of Leiden clusters against the 10 known labels, beside
   scanpy's standard PCA pipeline.
5. Differential expression: precision/recall of the posterior calls against the true fold
   changes, beside scanpy's Wilcoxon test.

Run (about 3-5 minutes on 2 CPU cores):

    python benchmarks/applications.py
    python benchmarks/applications.py --threads 1 --json results.json --out figures/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
import torch
from anndata import AnnData
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    adjusted_rand_score,
    balanced_accuracy_score,
    f1_score,
    normalized_mutual_info_score,
    precision_score,
    recall_score,
)

from genailab import VAE, TrainConfig
from genailab.apps import (
    cluster,
    denoise,
    denoising_error,
    differential_expression,
    generate,
    generated_vs_real,
    integrate,
    integration_scores,
)
from genailab.model.adversary import BATCH_CORRECTION as DEFAULT_ADVERSARY
from genailab.data import pbmc68k_counts, simulate
from genailab.eval import leiden_ari_nmi_best_resolution, precision_recall, top_k_overlap

RARE = "type_0"


def log_normalize(counts):
    """``sc.pp.normalize_total`` (10,000 per cell) + ``sc.pp.log1p``, as CSR."""
    scratch = AnnData(sp.csr_matrix(counts, dtype=np.float32))
    sc.pp.normalize_total(scratch, target_sum=1e4)
    sc.pp.log1p(scratch)
    return scratch.X


def split(adata: AnnData, *, rare_cells: int, seed: int) -> tuple[AnnData, AnnData]:
    """70/30 split of the cells; the training part keeps only ``rare_cells`` cells of the rare type."""
    rng = np.random.default_rng(seed)
    is_test = rng.random(adata.n_obs) < 0.3
    rare_train = np.flatnonzero(~is_test & (adata.obs["cell_type"] == RARE).to_numpy())
    dropped = rng.permutation(rare_train)[rare_cells:]
    keep = ~is_test
    keep[dropped] = False
    return adata[keep].copy(), adata[is_test].copy()


def denoising(test: AnnData, model: VAE) -> pd.DataFrame:
    denoise(test, model)
    return denoising_error(test, model)


def fidelity(train: AnnData, test: AnnData, model: VAE, seed: int) -> pd.DataFrame:
    rows = []
    for cell_type in (RARE, "type_1"):
        real_test = test[test.obs["cell_type"] == cell_type].layers["counts"]
        real_train = train[train.obs["cell_type"] == cell_type].layers["counts"]
        rows.append({"cell_type": cell_type, "source": "real training cells (floor)",
                     **generated_vs_real(real_test, real_train, seed=seed)})  # fmt: skip
        for source in ("prior", "posterior"):
            fake = generate(train, model, n_cells=real_test.shape[0], conditions={"cell_type": cell_type},
                            source=source, seed=seed)  # fmt: skip
            rows.append({"cell_type": cell_type, "source": source, **generated_vs_real(real_test, fake.X, seed=seed)})
    return pd.DataFrame(rows).set_index(["cell_type", "source"])


def classifier_scores(train_x, train_y, test_x, test_y, **options) -> dict[str, float]:
    predicted = LogisticRegression(max_iter=2000, **options).fit(train_x, train_y).predict(test_x)
    rare = np.asarray(test_y) == RARE
    return {
        "rare_recall": recall_score(rare, predicted == RARE),
        "rare_precision": precision_score(rare, predicted == RARE, zero_division=0),
        "rare_f1": f1_score(rare, predicted == RARE),
        "macro_f1": f1_score(test_y, predicted, average="macro"),
        "balanced_accuracy": balanced_accuracy_score(test_y, predicted),
    }


def augmentation(train: AnnData, test: AnnData, model: VAE, seed: int) -> pd.DataFrame:
    """Logistic regression on log-normalised counts, with and without generated cells of the rare type."""
    sizes = train.obs["cell_type"].value_counts()
    n_new = int(sizes.drop(RARE).median() - sizes[RARE])
    test_x, test_y = log_normalize(test.layers["counts"]), test.obs["cell_type"].astype(str).to_numpy()
    train_x, train_y = log_normalize(train.layers["counts"]), train.obs["cell_type"].astype(str).to_numpy()
    rows = {
        f"real only ({sizes[RARE]} {RARE} cells)": classifier_scores(train_x, train_y, test_x, test_y),
        "real only, class_weight='balanced'": classifier_scores(
            train_x, train_y, test_x, test_y, class_weight="balanced"
        ),
    }
    for source in ("prior", "posterior"):
        fake = generate(train, model, n_cells=n_new, conditions={"cell_type": RARE}, source=source, seed=seed)
        x = sp.vstack([train_x, log_normalize(fake.X)], format="csr")
        y = np.r_[train_y, np.repeat(RARE, n_new)]
        rows[f"+ {n_new} generated {RARE} cells ({source})"] = classifier_scores(x, y, test_x, test_y)
    return pd.DataFrame(rows).T


def true_log2_fc(adata: AnnData, in_group: np.ndarray, in_reference: np.ndarray) -> np.ndarray:
    truth = np.asarray(adata.layers["true_mean"], dtype=np.float64)
    log_p = np.log2(truth / truth.sum(axis=1, keepdims=True))
    return log_p[in_group].mean(0) - log_p[in_reference].mean(0)


def scanpy_calls(adata: AnnData, group: str, reference: str, delta: float) -> pd.DataFrame:
    """Wilcoxon on log-normalised counts, Benjamini-Hochberg adjusted."""
    scratch = AnnData(log_normalize(adata.layers["counts"]), obs=adata.obs[["cell_type"]].copy())
    scratch.var_names = adata.var_names
    sc.tl.rank_genes_groups(scratch, "cell_type", groups=[group], reference=reference, method="wilcoxon",
                            corr_method="benjamini-hochberg")  # fmt: skip
    table = sc.get.rank_genes_groups_df(scratch, group=group).set_index("names").reindex(adata.var_names)
    table["called"] = table["pvals_adj"] < 0.05
    table["called_lfc"] = table["called"] & (table["logfoldchanges"].abs() > delta)
    return table


def differential(adata: AnnData, model: VAE, *, delta: float, seed: int) -> pd.DataFrame:
    rows = []
    for group, reference in (("type_1", "type_2"), ("type_3", "rest")):
        labels = adata.obs["cell_type"].astype(str).to_numpy()
        in_reference = labels != group if reference == "rest" else labels == reference
        truth = pd.Series(true_log2_fc(adata, labels == group, in_reference), index=adata.var_names)
        is_true = truth.abs() > delta
        name = f"{group} vs {reference} ({int(is_true.sum())} true)"
        for level in ("cell", "group"):
            ours = differential_expression(adata, model, groupby="cell_type", group=group, reference=reference,
                                           delta=delta, level=level, seed=seed).reindex(adata.var_names)  # fmt: skip
            rows.append({"comparison": name, "method": f"genailab {level} level, FDR 0.05",
                         "called": int(ours["is_de_fdr"].sum()), **precision_recall(ours["is_de_fdr"], is_true),
                         **lfc_fit(ours["lfc_mean"], truth)})  # fmt: skip
        theirs = scanpy_calls(adata, group, reference, delta)
        rows.append({"comparison": name, "method": "scanpy wilcoxon BH<0.05 & |logFC|>delta",
                     "called": int(theirs["called_lfc"].sum()), **precision_recall(theirs["called_lfc"], is_true),
                     **lfc_fit(theirs["logfoldchanges"], truth)})  # fmt: skip
        rows.append({"comparison": name, "method": "scanpy wilcoxon BH<0.05",
                     "called": int(theirs["called"].sum()), **precision_recall(theirs["called"], is_true)})  # fmt: skip
        agreement = precision_recall(ours["is_de_fdr"], theirs["called_lfc"])
        overlap = top_k_overlap(ours["lfc_mean"], theirs["logfoldchanges"], k=50)
        rows.append({"comparison": name, "method": "genailab group calls vs scanpy BH & |logFC| (as truth)",
                     **agreement, "top50_overlap": overlap})  # fmt: skip
    return pd.DataFrame(rows).set_index(["comparison", "method"])


def lfc_fit(estimate, truth) -> dict[str, float]:
    """Pearson correlation with the true LFC, and the slope of estimate on truth (below 1: shrunk)."""
    estimate, truth = np.asarray(estimate, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    slope = float(np.polyfit(truth, estimate, 1)[0])
    return {"lfc_pearson": float(np.corrcoef(estimate, truth)[0, 1]), "lfc_slope": slope}


def batch_correction(args) -> pd.DataFrame:
    adata = simulate(args.batch_cells, args.genes, n_cell_types=5, n_batches=3, likelihood="nb",
                     batch_effect_scale=args.batch_effect, seed=args.seed + 1)  # fmt: skip
    train = TrainConfig(epochs=args.epochs, seed=args.seed, progress=False)
    options = dict(latent_dim=10, hidden_dims=(128, 128))
    raw_gap = batch_gap(adata, log_normalize(adata.layers["counts"]).toarray())
    rows = {"true latent (simulator)": integration_scores(adata, batch_key="batch", label_key="cell_type",
                                                           key="X_true_latent")}  # fmt: skip
    plain = VAE(adata, likelihood="nb", layer="counts", **options).fit(train)
    adata.obsm["X_plain"] = plain.get_latent()
    rows["VAE without batch"] = integration_scores(adata, batch_key="batch", label_key="cell_type", key="X_plain")
    with_adversary = "batch-conditioned VAE + adversary (alternating, weight 5)"
    for name, adversary in (("batch-conditioned VAE, no adversary", None), (with_adversary, DEFAULT_ADVERSARY)):
        integrate(adata, batch_key="batch", layer="counts", adversary=adversary, train=train, **options)
        rows[name] = integration_scores(adata, batch_key="batch", label_key="cell_type")
        corrected = np.log1p(adata.layers["genailab_corrected"])
        rows[name]["batch_gap_ratio"] = batch_gap(adata, corrected) / raw_gap
    return pd.DataFrame(rows).T


def batch_gap(adata: AnnData, values: np.ndarray) -> float:
    """Mean |difference between batch means| over cell types, batch pairs and genes."""
    gaps = []
    batches = adata.obs["batch"].cat.categories
    for cell_type in adata.obs["cell_type"].cat.categories:
        in_type = (adata.obs["cell_type"] == cell_type).to_numpy()
        means = [values[in_type & (adata.obs["batch"] == b).to_numpy()].mean(0) for b in batches]
        gaps += [np.abs(means[i] - means[j]).mean() for i in range(len(means)) for j in range(i + 1, len(means))]
    return float(np.mean(gaps))


def clustering(args) -> pd.DataFrame:
    adata = pbmc68k_counts()
    model = VAE(adata, likelihood="nb", layer="counts", latent_dim=10, hidden_dims=(128, 128))
    model.fit(TrainConfig(epochs=args.epochs, seed=args.seed, kl_warmup_epochs=20, progress=False))
    plot = None if args.out is None else args.out / "pbmc68k_umap.png"
    rows = {}
    for resolution in (0.8, 1.0):
        cluster(adata, model, resolution=resolution, plot=plot if resolution == 0.8 else None, color=["cell_type"],
                seed=args.seed)  # fmt: skip
        rows[f"genailab latent, Leiden {resolution}"] = agreement(adata)
    best = leiden_ari_nmi_best_resolution(adata.obsm["X_genailab"], adata.obs["cell_type"], seed=args.seed)
    rows["genailab latent, best resolution (scib sweep)"] = {k: best[k] for k in ("n_clusters", "ari", "nmi")}
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=50, random_state=args.seed)
    sc.pp.neighbors(adata, n_neighbors=15, random_state=args.seed, transformer="sklearn")
    for resolution in (0.8, 1.0):
        sc.tl.leiden(adata, resolution=resolution, random_state=args.seed, flavor="igraph", n_iterations=2,
                     directed=False)  # fmt: skip
        rows[f"scanpy PCA(50) of log-normalised counts, Leiden {resolution}"] = agreement(adata)
    best = leiden_ari_nmi_best_resolution(adata.obsm["X_pca"], adata.obs["cell_type"], seed=args.seed)
    rows["scanpy PCA(50), best resolution (scib sweep)"] = {k: best[k] for k in ("n_clusters", "ari", "nmi")}
    return pd.DataFrame(rows).T


def agreement(adata: AnnData) -> dict[str, float]:
    labels, clusters = adata.obs["cell_type"], adata.obs["leiden"]
    return {"n_clusters": clusters.nunique(), "ari": adjusted_rand_score(labels, clusters),
            "nmi": normalized_mutual_info_score(labels, clusters)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60, help="Epochs per model (early stopping may end sooner).")
    parser.add_argument("--cells", type=int, default=3000, help="Simulated cells for denoising, generation and DE.")
    parser.add_argument("--batch-cells", type=int, default=1200, help="Simulated cells for batch correction.")
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument("--batch-effect", type=float, default=1.0, help="Simulated batch effect scale (default 0.3).")
    parser.add_argument("--rare-cells", type=int, default=15, help=f"Training cells kept of the rare type {RARE}.")
    parser.add_argument("--delta", type=float, default=1.0, help="DE threshold on |log2 fold change|.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (1 avoids thrashing on a busy shared machine).")
    parser.add_argument("--json", type=Path, help="Also write the tables to this JSON file.")
    parser.add_argument("--out", type=Path, help="Folder for figures (the PBMC UMAP).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    pd.set_option("display.width", 200, "display.max_columns", 20, "display.precision", 3)
    started = time.perf_counter()

    sim = simulate(args.cells, args.genes, n_cell_types=5, n_batches=2, likelihood="zinb", dropout=0.1, seed=args.seed)
    train, test = split(sim, rare_cells=args.rare_cells, seed=args.seed)
    model = VAE(train, likelihood="zinb", layer="counts", condition_keys=["batch", "cell_type"], latent_dim=10,
                hidden_dims=(128, 128))  # fmt: skip
    model.fit(TrainConfig(epochs=args.epochs, seed=args.seed, progress=False))
    print(f"Simulated {sim.n_obs} cells x {sim.n_vars} genes (ZINB, 5 types, 2 batches); ZINB VAE on batch + cell type "
          f"trained {len(model.history)} epochs on {train.n_obs} cells ({args.rare_cells} of {RARE}); "
          f"{test.n_obs} held out.\n")  # fmt: skip

    sections = {
        "1. Denoising: error to the true means on held-out cells": lambda: denoising(test, model),
        "2a. Generation fidelity vs held-out real cells of the type (AUC 0.5 and distances 0 = indistinguishable)":
            lambda: fidelity(train, test, model, args.seed),
        f"2b. Augmenting the rare {RARE}: logistic regression on log-normalised counts, scored on held-out cells":
            lambda: augmentation(train, test, model, args.seed),
        f"5. Differential expression on held-out cells, truth |true log2 FC| > {args.delta}; lfc_slope < 1: shrunk":
            lambda: differential(test, model, delta=args.delta, seed=args.seed),
        f"3. Batch correction (simulated, 3 batches, batch effect {args.batch_effect}): mixing and conservation, "
        "1 best; batch_gap_ratio: within-type batch differences of corrected / log-normalised expression":
            lambda: batch_correction(args),
        "4. Cell-type discovery on pbmc68k (700 cells, 10 labels)": lambda: clustering(args),
    }  # fmt: skip
    tables = {}
    for title, compute in sections.items():
        section_started = time.perf_counter()
        tables[title] = compute()
        print(f"{title} [{time.perf_counter() - section_started:.0f} s]\n{tables[title]}\n", flush=True)
    print(f"Total {time.perf_counter() - started:.0f} s")
    if args.json is not None:
        records = {title: json.loads(table.reset_index().to_json(orient="records")) for title, table in tables.items()}
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
