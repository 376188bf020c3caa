"""genailab beside scvi-tools on the same cells: speed, memory, held-out likelihood, imputation, latent.

For each dataset (simulated counts with cell types and batches; the real PBMC counts that ship with
scanpy) and each likelihood (zinb, nb), both tools train the same architecture (2 x 128 hidden,
latent 10) for the same epochs, batch size (128), learning rate (1e-3) and KL warm-up, on the same
training cells, with no early stopping. Each model trains in its own subprocess with
``torch.set_num_threads(2)``, so its peak memory is its own ``ru_maxrss``. Measured:

* training cells/s (training cells x epochs / wall time of the training call);
* memory: the worker's peak RSS through training (VmHWM: Python, torch, the tool's imports and
  the data, read the same way for both) and the part added by training (that peak minus the
  resident size just before training), MiB;
* held-out log-likelihood per cell: IWAE bound with the same K on the same held-out cells
  (genailab ``get_marginal_ll``, scVI ``get_marginal_ll``), higher is better;
* imputation: 10% of non-zero counts hidden (one shared mask), a second model trained on all cells
  of the masked data, predictions = denoised mean at the observed library averaged over 25
  posterior samples, median |predicted - hidden|, lower is better;
* ARI/NMI of Leiden clusters of each latent (all cells) against the labels, at the best of scib's
  resolutions 0.1..2.0; batch mixing by kNN batch entropy (k=50) and scIB's iLISI (perplexity 30), 1 = mixed.

Run (scvi-tools must be importable for its rows; ``pip install -e '.[bench]'``):

    /opt/scvi-venv/bin/python benchmarks/vs_scvi.py            # 10,000 x 2,000 simulated + PBMC
    /opt/scvi-venv/bin/python benchmarks/vs_scvi.py --quick    # a small run to check the set-up
    python benchmarks/vs_scvi.py                                # genailab rows only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

THREADS = 2
IMPUTATION_SAMPLES = 25  # posterior samples averaged for the denoised mean, the same for both tools


# -- worker: one tool, one likelihood, in its own process -----------------------------------------
def _rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, MiB.

    Not ``ru_maxrss``: Linux carries it across exec, so a worker started from the parent (which
    holds the whole dataset) would report the parent's peak as its own.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    return float("nan")


def _genailab_fit(adata, args, likelihood: str, batch_key: str | None):
    from genailab import VAE

    model = VAE(adata, likelihood=likelihood, layer="counts", condition_keys=[batch_key] if batch_key else [],
                latent_dim=10, hidden_dims=(128, 128))
    model.fit(epochs=args.epochs, batch_size=128, lr=1e-3, kl_warmup_epochs=args.kl_warmup, validation_fraction=0.0,
              early_stopping_patience=None, lr_plateau_patience=None, seed=0, progress=False, device="cpu")
    return model


def _scvi_fit(adata, args, likelihood: str, batch_key: str | None):
    import scvi

    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key=batch_key)
    model = scvi.model.SCVI(adata, n_hidden=128, n_layers=2, n_latent=10, gene_likelihood=likelihood)
    model.train(max_epochs=args.epochs, batch_size=128, train_size=1.0, accelerator="cpu", devices=1,
                early_stopping=False, enable_progress_bar=False,
                plan_kwargs={"lr": 1e-3, "n_epochs_kl_warmup": args.kl_warmup})
    return model


def _worker(args) -> None:
    import anndata as ad
    import torch

    torch.set_num_threads(THREADS)
    work = Path(args.workdir)
    train, heldout = ad.read_h5ad(work / "train.h5ad"), ad.read_h5ad(work / "heldout.h5ad")
    batch_key = "batch" if "batch" in train.obs else None
    fit = _scvi_fit if args.worker == "scvi" else _genailab_fit
    before = _rss_mib("VmRSS")
    started = time.perf_counter()
    model = fit(train, args, args.likelihood, batch_key)
    seconds = time.perf_counter() - started
    peak = _rss_mib("VmHWM")
    result = {"cells_per_s": train.n_obs * args.epochs / seconds, "train_s": seconds, "peak_rss_mib": peak,
              "added_rss_mib": peak - before}

    torch.manual_seed(0)
    if args.worker == "scvi":
        ll = model.get_marginal_ll(heldout, n_mc_samples=args.n_samples, return_mean=False)
        latents = [model.get_latent_representation(a) for a in (train, heldout)]
    else:
        ll = model.get_marginal_ll(heldout, n_samples=args.n_samples)
        latents = [model.get_latent(a) for a in (train, heldout)]
    result["marginal_ll"] = float(np.mean(np.asarray(ll)))
    np.save(work / f"latent_{args.worker}_{args.likelihood}.npy", np.concatenate(latents))

    masked = ad.read_h5ad(work / "masked.h5ad")
    mask = np.load(work / "mask.npz")
    model = fit(masked, args, args.likelihood, batch_key)
    torch.manual_seed(0)
    if args.worker == "scvi":
        predicted = model.get_normalized_expression(masked, library_size="latent", n_samples=IMPUTATION_SAMPLES,
                                                    return_mean=True, return_numpy=True)
    else:
        predicted = model.get_normalized_expression(library_size="observed", n_samples=IMPUTATION_SAMPLES)
    hidden = np.asarray(predicted)[mask["rows"], mask["cols"]]
    result["imputation_l1"] = float(np.median(np.abs(hidden - mask["values"])))
    (work / f"result_{args.worker}_{args.likelihood}.json").write_text(json.dumps(result))


# -- parent: data, subprocesses, metrics of the latents, the table ---------------------------------
def _datasets(quick: bool):
    from genailab.data import pbmc68k_counts, simulate

    n_cells, n_genes = (2000, 500) if quick else (10_000, 2_000)
    sim = simulate(n_cells, n_genes, n_cell_types=8, n_batches=2, likelihood="nb", seed=0)
    pbmc = pbmc68k_counts()
    yield f"simulated {n_cells:,} x {n_genes:,}, 8 types, 2 batches", sim, "batch"
    yield f"PBMC (pbmc68k_reduced counts) {pbmc.n_obs} x {pbmc.n_vars}, 10 types", pbmc, None


def _prepare(adata, batch_key: str | None, work: Path) -> np.ndarray:
    """Write train/held-out cells (90/10, seeded) and the masked copy of all cells; returns the obs of
    every cell in latent order (training cells, then held-out cells)."""
    import anndata as ad

    from genailab.report import masked_anndata

    keep = ["cell_type"] + ([batch_key] if batch_key else [])
    adata = ad.AnnData(X=adata.layers["counts"].copy(), obs=adata.obs[keep].copy(), var=adata.var[[]].copy(),
                       layers={"counts": adata.layers["counts"].copy()})
    order = np.random.default_rng(0).permutation(adata.n_obs)
    n_heldout = adata.n_obs // 10
    heldout, train = np.sort(order[:n_heldout]), np.sort(order[n_heldout:])
    adata[train].copy().write_h5ad(work / "train.h5ad")
    adata[heldout].copy().write_h5ad(work / "heldout.h5ad")
    masked, rows, cols, values = masked_anndata(adata, layer="counts", fraction=0.1, seed=0)
    masked.write_h5ad(work / "masked.h5ad")
    np.savez(work / "mask.npz", rows=rows, cols=cols, values=values)
    return adata.obs.iloc[np.r_[train, heldout]]


def _latent_scores(latent: np.ndarray, obs, batch_key: str | None) -> dict:
    from genailab.eval import ilisi, knn_batch_entropy, leiden_ari_nmi_best_resolution

    scores = leiden_ari_nmi_best_resolution(latent, obs["cell_type"].astype(str).to_numpy())
    result = {"ari": scores["ari"], "nmi": scores["nmi"]}
    if batch_key:
        batch = obs[batch_key].astype(str).to_numpy()
        result.update(batch_entropy=knn_batch_entropy(latent, batch, k=50), ilisi=ilisi(latent, batch))
    return result


COLUMNS = [("cells_per_s", "cells/s", "{:.0f}"), ("peak_rss_mib", "peak MiB", "{:.0f}"),
           ("added_rss_mib", "+MiB train", "{:.0f}"),
           ("marginal_ll", "held-out LL", "{:.1f}"), ("imputation_l1", "imput. L1", "{:.3f}"),
           ("ari", "ARI", "{:.3f}"), ("nmi", "NMI", "{:.3f}"), ("batch_entropy", "batch ent.", "{:.3f}"),
           ("ilisi", "iLISI", "{:.3f}")]


def _table(title: str, rows: list[tuple[str, dict]]) -> str:
    header = f"| model | {' | '.join(name for _, name, _ in COLUMNS)} |"
    lines = [f"\n{title}", header, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, result in rows:
        cells = [fmt.format(result[key]) if key in result else "-" for key, _, fmt in COLUMNS]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 x 500 simulated cells and 5 epochs")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 30, or 5 with --quick)")
    parser.add_argument("--kl-warmup", type=int, default=None, help="KL warm-up epochs for both (default epochs / 4)")
    parser.add_argument("--n-samples", type=int, default=100, help="importance samples K for the held-out likelihood")
    parser.add_argument("--likelihoods", default="zinb,nb")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument("--worker", choices=["genailab", "scvi"], help=argparse.SUPPRESS)
    parser.add_argument("--likelihood", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.epochs = args.epochs or (5 if args.quick else 30)
    args.kl_warmup = args.kl_warmup if args.kl_warmup is not None else max(1, args.epochs // 4)
    if args.worker:
        _worker(args)
        return

    tools = ["genailab"] + (["scvi"] if importlib.util.find_spec("scvi") else [])
    if "scvi" not in tools:
        print("scvi-tools is not importable here: genailab rows only (pip install -e '.[bench]' to compare).")
    print(f"epochs {args.epochs}, KL warm-up {args.kl_warmup}, batch 128, 2x128 hidden, latent 10, "
          f"{THREADS} torch threads, IWAE K={args.n_samples}")
    results = {}
    for title, adata, batch_key in _datasets(args.quick):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            obs = _prepare(adata, batch_key, work)
            rows = []
            for likelihood in args.likelihoods.split(","):
                for tool in tools:
                    command = [sys.executable, __file__, "--worker", tool, "--likelihood", likelihood, "--workdir", tmp,
                               "--epochs", str(args.epochs), "--kl-warmup", str(args.kl_warmup),
                               "--n-samples", str(args.n_samples)]
                    subprocess.run(command, check=True)
                    result = json.loads((work / f"result_{tool}_{likelihood}.json").read_text())
                    result.update(_latent_scores(np.load(work / f"latent_{tool}_{likelihood}.npy"), obs, batch_key))
                    rows.append((f"{'scVI' if tool == 'scvi' else 'genailab'} {likelihood}", result))
                    print(_table(title, rows[-1:]), flush=True)
        results[title] = dict(rows)
        print(_table(title, rows), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
