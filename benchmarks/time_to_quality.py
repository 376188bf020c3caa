"""Time to quality at each tool's defaults: wall time of the fit, held-out log-likelihood, latent quality.

On each dataset (simulated 20,000 x 2,000 ZINB counts with 3 batches; the PBMC counts that ship
with scanpy) both tools train at their own defaults on the same training cells (90%, seeded; the
rest are held out): scvi-tools ``SCVI.setup_anndata(adata, layer="counts", batch_key=...)``,
``SCVI(adata).train()``; genailab ``VAE(adata, likelihood="zinb", layer="counts",
condition_keys=[batch]).fit()`` (ZINB is scVI's default likelihood; genailab's is NB). Each fit runs in
its own subprocess with ``torch.set_num_threads(2)`` (``--threads``). Each tool holds out its own validation cells
from the training cells (10% for both). Reported per tool:

* fit wall time (and the worker's CPU time: on a shared machine wall time also counts waiting);
* epochs trained;
* held-out log-likelihood per cell, IWAE bound with the same K on the same held-out cells
  (genailab ``get_marginal_ll``, scVI ``get_marginal_ll``), higher is better;
* kNN purity (share of each cell's 15 nearest latent neighbours with its cell type) and the ARI of
  Leiden clusters (resolution 1) against the cell types, on the latents of all cells, and the ARI
  at scib's best resolution (the highest NMI over 0.1, 0.2, ..., 2.0) with that resolution.

Run (scvi-tools must be importable for its rows; without it only genailab's rows are printed):

    python benchmarks/time_to_quality.py                            # 20,000 simulated + PBMC
    python benchmarks/time_to_quality.py --cells 5000 --datasets sim
    .venv-scvi/bin/python benchmarks/time_to_quality.py --cells 5000   # with scvi-tools (see README, Speed)
    .venv-scvi/bin/python benchmarks/time_to_quality.py --cells 20000 --datasets sim --tools scvi --threads 1 \
        --json scvi_rows.jsonl                                     # scvi-tools alone, its rows kept
    python benchmarks/time_to_quality.py --cells 20000 --datasets sim --tools genailab --threads 1 \
        --compare scvi_rows.jsonl                                  # genailab, with the ratio to the kept rows
    python benchmarks/time_to_quality.py --datasets pbmc --tools genailab --genailab-options '{"lr": 1e-3}'
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

THREADS = 2
PURITY_NEIGHBOURS = 15


# -- worker: one tool on one dataset, in its own process ------------------------------------------
def _genailab_fit(adata, batch_key: str | None, likelihood: str, options: dict, model_options: dict):
    from genailab import VAE

    model = VAE(adata, likelihood=likelihood, layer="counts", condition_keys=[batch_key] if batch_key else [],
                **model_options)  # fmt: skip
    model.fit(progress=False, **options)
    return model, len(model.history)


def _scvi_fit(adata, batch_key: str | None, likelihood: str, options: dict, model_options: dict):
    import scvi

    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key=batch_key)
    model = scvi.model.SCVI(adata, gene_likelihood=likelihood)
    model.train(enable_progress_bar=False)
    return model, len(model.history["elbo_train"])


def _worker(args) -> None:
    import anndata as ad
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    train, heldout = ad.read_h5ad(work / "train.h5ad"), ad.read_h5ad(work / "heldout.h5ad")
    batch_key = "batch" if "batch" in train.obs else None
    fit = _scvi_fit if args.worker == "scvi" else _genailab_fit
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    model, epochs = fit(train, batch_key, args.likelihood, json.loads(args.genailab_options), json.loads(args.model_options))
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)
    torch.manual_seed(0)
    if args.worker == "scvi":
        ll = model.get_marginal_ll(heldout, n_mc_samples=args.n_samples, return_mean=False)
        latents = [model.get_latent_representation(a) for a in (train, heldout)]
    else:
        ll = model.get_marginal_ll(heldout, n_samples=args.n_samples)
        latents = [model.get_latent(a) for a in (train, heldout)]
    np.save(work / f"latent_{args.worker}.npy", np.concatenate(latents))
    result = {"fit_s": seconds, "cpu_s": cpu_seconds, "epochs": epochs, "marginal_ll": float(np.mean(np.asarray(ll)))}
    (work / f"result_{args.worker}.json").write_text(json.dumps(result))


# -- parent: data, subprocesses, latent metrics, the table ----------------------------------------
def _datasets(names: list[str], n_cells: int):
    from genailab.data import pbmc68k_counts, simulate

    if "sim" in names:
        sim = simulate(n_cells, 2_000, n_batches=3, likelihood="zinb", seed=0)
        yield f"simulated {n_cells:,} x 2,000 ZINB, 3 batches", sim, "batch"
    if "pbmc" in names:
        pbmc = pbmc68k_counts()
        yield f"PBMC (pbmc68k_reduced counts) {pbmc.n_obs} x {pbmc.n_vars}", pbmc, None


def _prepare(adata, batch_key: str | None, work: Path):
    """Write the training (90%) and held-out (10%) cells; returns the cell types in latent order."""
    import anndata as ad

    keep = ["cell_type"] + ([batch_key] if batch_key else [])
    counts = adata.layers["counts"]
    adata = ad.AnnData(X=counts.copy(), obs=adata.obs[keep].copy(), var=adata.var[[]].copy(), layers={"counts": counts.copy()})
    order = np.random.default_rng(0).permutation(adata.n_obs)
    n_heldout = adata.n_obs // 10
    heldout, train = np.sort(order[:n_heldout]), np.sort(order[n_heldout:])
    adata[train].copy().write_h5ad(work / "train.h5ad")
    adata[heldout].copy().write_h5ad(work / "heldout.h5ad")
    return adata.obs["cell_type"].to_numpy()[np.r_[train, heldout]]


def knn_purity(latent: np.ndarray, labels: np.ndarray, k: int = PURITY_NEIGHBOURS) -> float:
    """Mean share of each cell's k nearest neighbours (itself excluded) that share its label."""
    from sklearn.neighbors import NearestNeighbors

    _, neighbours = NearestNeighbors(n_neighbors=k + 1).fit(latent).kneighbors(latent)
    return float(np.mean(labels[neighbours[:, 1:]] == labels[:, None]))


def _run_tool(tool: str, args, work: Path) -> dict | None:
    command = [sys.executable, __file__, "--worker", tool, "--workdir", str(work), "--n-samples", str(args.n_samples),
               "--likelihood", args.likelihood, "--genailab-options", args.genailab_options, "--threads", str(args.threads),
               "--model-options", args.model_options]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  {tool} failed:\n{done.stderr[-2000:]}")
        return None
    return json.loads((work / f"result_{tool}.json").read_text())


def _earlier_rows(path: str | None, dataset: str, threads: int, skip: list[str]) -> dict:
    """Rows of an earlier ``--json`` run for ``dataset`` at the same thread count (the newest per tool), tools in ``skip`` left out."""
    if path is None:
        return {}
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {row["tool"]: row for row in rows if row["dataset"] == dataset and row["threads"] == threads and row["tool"] not in skip}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20_000, help="Simulated cells (2,000 genes).")
    parser.add_argument("--datasets", default="sim,pbmc", help="Comma-separated: sim, pbmc.")
    parser.add_argument("--tools", default="genailab,scvi", help="Comma-separated; scvi is skipped when not importable.")
    parser.add_argument("--n-samples", type=int, default=100, help="Importance samples K of the held-out likelihood.")
    parser.add_argument("--likelihood", default="zinb", choices=("zinb", "nb"))
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads per fit.")
    parser.add_argument("--genailab-options", default="{}", help="JSON of fit() options to try instead of the defaults.")
    parser.add_argument("--model-options", default="{}", help="JSON of genailab VAE(...) architecture options to try.")
    parser.add_argument("--json", default=None, help="Append each row (dataset, tool, figures) to this JSON-lines file.")
    parser.add_argument("--compare", default=None, help="JSON-lines file of rows from an earlier run (e.g. scvi-tools alone): "
                        "its rows for the same dataset join the ratio.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    from genailab.eval.latent import leiden_ari_nmi, leiden_ari_nmi_best_resolution

    tools = args.tools.split(",")
    if "scvi" in tools and importlib.util.find_spec("scvi") is None:
        print("scvi-tools is not importable here: genailab rows only.")
        tools = [t for t in tools if t != "scvi"]
    print(f"{args.threads} torch threads per fit; held-out LL with K={args.n_samples}; likelihood {args.likelihood}")
    for name, adata, batch_key in _datasets(args.datasets.split(","), args.cells):
        with tempfile.TemporaryDirectory() as folder:
            work = Path(folder)
            labels = _prepare(adata, batch_key, work)
            print(f"\n{name}: {adata.n_obs - adata.n_obs // 10:,} training cells, {adata.n_obs // 10:,} held out")
            print(f"  {'tool':9s} {'fit s':>8s} {'CPU s':>8s} {'epochs':>6s} {'held-out LL':>12s} {'kNN purity':>10s} {'ARI':>6s} {'ARI (sweep)':>16s}")
            results = _earlier_rows(args.compare, name, args.threads, tools)
            for tool, row in results.items():
                print(f"  {tool:9s} {row['fit_s']:8.1f} {row['cpu_s']:8.1f} {row['epochs']:6d} {row['marginal_ll']:12.1f} "
                      f"{row['purity']:10.3f} {row['ari']:6.3f} {_sweep(row):>16s}  (from {args.compare})")
            for tool in tools:
                result = _run_tool(tool, args, work)
                if result is None:
                    continue
                latent = np.load(work / f"latent_{tool}.npy")
                result["purity"] = knn_purity(latent, labels)
                result["ari"] = leiden_ari_nmi(latent, labels)["ari"]
                best = leiden_ari_nmi_best_resolution(latent, labels)
                result["ari_sweep"], result["sweep_resolution"] = best["ari"], best["resolution"]
                results[tool] = result
                if args.json:
                    with open(args.json, "a") as rows:
                        rows.write(json.dumps({"dataset": name, "tool": tool, "threads": args.threads, **result}) + "\n")
                print(f"  {tool:9s} {result['fit_s']:8.1f} {result['cpu_s']:8.1f} {result['epochs']:6d} "
                      f"{result['marginal_ll']:12.1f} {result['purity']:10.3f} {result['ari']:6.3f} {_sweep(result):>16s}",
                      flush=True)
            if {"genailab", "scvi"} <= set(results):
                g, s = results["genailab"], results["scvi"]
                print(f"  scvi-tools / genailab fit time: {s['fit_s'] / g['fit_s']:.1f}x wall, "
                      f"{s['cpu_s'] / g['cpu_s']:.1f}x CPU (target >= 30x); held-out LL genailab - scvi: "
                      f"{g['marginal_ll'] - s['marginal_ll']:+.1f} (target >= 0)")


def _sweep(row: dict) -> str:
    """The sweep's ARI and its resolution, e.g. '0.995 at 0.2' ('n/a' for rows saved before the sweep was added)."""
    return f"{row['ari_sweep']:.3f} at {row['sweep_resolution']:g}" if "ari_sweep" in row else "n/a"


if __name__ == "__main__":
    main()
