"""Out-of-core benchmark: simulate a large h5ad, train one epoch from the backed file, report memory and speed.

    python benchmarks/out_of_core.py                       # 1,000,000 cells x 2,000 genes
    python benchmarks/out_of_core.py --cells 100000        # smaller
    python benchmarks/out_of_core.py --loader-only --path ooc_100000.h5ad --keep   # the loader alone
    python benchmarks/out_of_core.py --defaults --path ooc_1000000.h5ad --keep     # genailab's default fit
    python benchmarks/out_of_core.py --defaults --path ooc_1000000.h5ad --fit-options '{"auto_epoch_scale": 3000}'

The file is written by a child process (its memory is reported apart), then this process opens it
with ``backed="r"`` and fits an NB model for one epoch. Peak RSS is this process's
``ru_maxrss``: imports, the data checks, the epoch and the validation pass. The target is under 2 GB.
With ``--loader-only`` the process only iterates the training loader over the file (after one
untimed pass that puts the file in the page cache), at batch sizes 128 and 512, with and without
the sparse entries the count likelihood uses: the disk-to-minibatch rate, target 50,000 cells/s.
With ``--defaults`` the process fits ``VAE(adata, likelihood="nb", condition_keys=["batch"]).fit()``
with every default (``--model-options`` / ``--fit-options`` change some, as JSON) and prints the
epochs, the time and the validation negative ELBO per cell after each epoch (the trainer's seeded 10%
validation cells, the same in every run): does the default run stop where longer ones would?
An existing ``--path`` is read as it is (not rewritten) by ``--loader-only`` and ``--defaults``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import anndata
import torch

import genailab
from genailab.data import write_simulated_h5ad


def peak_rss_gib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def write(path: Path, cells: int, genes: int, seed: int) -> None:
    write_simulated_h5ad(path, cells, genes, chunk_size=16_384, n_cell_types=5, n_batches=2, seed=seed)


def train(path: Path, batch_size: int, chunk_rows: int, chunks_in_memory: int, seed: int) -> None:
    adata = anndata.read_h5ad(path, backed="r")
    model = genailab.VAE(adata, likelihood="nb", condition_keys=["batch"], latent_dim=10, hidden_dims=(128, 128))
    started = time.perf_counter()
    model.fit(epochs=1, batch_size=batch_size, chunk_rows=chunk_rows, chunks_in_memory=chunks_in_memory,
              validation_fraction=0.05, seed=seed, device="cpu", progress=False)
    total = time.perf_counter() - started
    epoch = model.history[0]["seconds"]
    info = model.training_info
    print(f"torch threads: {torch.get_num_threads()}; batch size {batch_size}; chunks of {chunk_rows} rows, "
          f"{chunks_in_memory} in memory")
    print(f"epoch: {info['n_train']:,} training + {info['n_validation']:,} validation cells in {epoch:.1f} s "
          f"= {info['n_cells'] / epoch:,.0f} cells/s ({info['n_train'] / epoch:,.0f} training cells/s)")
    print(f"fit total (with the data checks, library sizes and data hash, each a pass over the file): {total:.1f} s")
    print(f"final training loss {model.history[0]['train_loss']:.1f}, validation negative ELBO "
          f"{model.history[0]['val_elbo_loss']:.1f} per cell")
    print(f"peak RSS of the training process: {peak_rss_gib():.2f} GiB")


def fit_defaults(path: Path, model_options: dict, fit_options: dict) -> None:
    adata = anndata.read_h5ad(path, backed="r")
    model = genailab.VAE(adata, likelihood="nb", condition_keys=["batch"], **model_options)
    started, cpu_started = time.perf_counter(), time.process_time()
    model.fit(progress=False, **fit_options)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    info = model.training_info
    print(f"torch threads: {torch.get_num_threads()}; model options {model_options}, fit options {fit_options}; "
          f"hidden layers {model.constructor_options()['hidden_dims']}")
    print(f"{len(model.history)} epochs on {info['n_train']:,} training cells in {seconds:.0f} s ({cpu_seconds:.0f} CPU s); "
          f"peak RSS {peak_rss_gib():.2f} GiB")
    curve = ", ".join(f"{row['val_elbo_loss']:.1f}" for row in model.history)
    print(f"validation negative ELBO per cell ({info['n_validation']:,} cells) after each epoch: {curve}")


def loader_only(path: Path, chunk_rows: int, chunks_in_memory: int, seed: int) -> None:
    from genailab.data.backed import OnDiskMatrix
    from genailab.data.loader import MinibatchLoader

    matrix = OnDiskMatrix(anndata.read_h5ad(path, backed="r").X)
    for _ in matrix.blocks():  # one pass to page the file in: the figure is the loader's, not the disk's
        pass
    print(f"loader only, one process, {matrix.shape[0]:,} cells x {matrix.shape[1]:,} genes from {path} (page-cached); "
          f"chunks of {chunk_rows} rows, {chunks_in_memory} in memory")
    for batch_size in (128, 512):
        for sparse_counts in (True, False):
            loader = MinibatchLoader(matrix, batch_size=batch_size, seed=seed, sparse_counts=sparse_counts,
                                     chunk_rows=chunk_rows, chunks_in_memory=chunks_in_memory)
            started, cpu_started = time.perf_counter(), time.process_time()
            n_cells = sum(batch.x.shape[0] for batch in loader)
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
            print(f"  batch {batch_size:4d}, sparse entries {'on ' if sparse_counts else 'off'}: {n_cells:,} cells in "
                  f"{seconds:.1f} s = {n_cells / seconds:,.0f} cells/s ({n_cells / cpu_seconds:,.0f} per CPU second: "
                  "the rate on an idle core)")
    print(f"peak RSS of the loading process: {peak_rss_gib():.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--path", type=Path, default=None, help="h5ad to write and read (default: ./ooc_<cells>.h5ad)")
    parser.add_argument("--keep", action="store_true", help="Keep the h5ad afterwards (deleted by default).")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--chunk-rows", type=int, default=2048)
    parser.add_argument("--chunks-in-memory", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loader-only", action="store_true", help="Time the loader alone (no model).")
    parser.add_argument("--defaults", action="store_true", help="Fit genailab at its defaults (no fixed epochs).")
    parser.add_argument("--model-options", default="{}", help="JSON of VAE(...) options for --defaults.")
    parser.add_argument("--fit-options", default="{}", help="JSON of fit() options for --defaults.")
    parser.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = args.path or Path(f"ooc_{args.cells}.h5ad")
    if args.write_only:
        write(path, args.cells, args.genes, args.seed)
        return
    if args.loader_only and path.exists():
        loader_only(path, args.chunk_rows, args.chunks_in_memory, args.seed)
        return
    if args.defaults and path.exists():
        fit_defaults(path, json.loads(args.model_options), json.loads(args.fit_options))
        return
    started = time.perf_counter()
    command = [sys.executable, __file__, "--write-only", "--cells", str(args.cells), "--genes", str(args.genes),
               "--seed", str(args.seed), "--path", str(path)]
    subprocess.run(command, check=True)
    print(f"wrote {args.cells:,} cells x {args.genes:,} genes to {path}: {path.stat().st_size / 2**30:.2f} GiB in "
          f"{time.perf_counter() - started:.0f} s (writer peak RSS {peak_rss_gib(resource.RUSAGE_CHILDREN):.2f} GiB)")
    try:
        if args.loader_only:
            loader_only(path, args.chunk_rows, args.chunks_in_memory, args.seed)
        elif args.defaults:
            fit_defaults(path, json.loads(args.model_options), json.loads(args.fit_options))
        else:
            train(path, args.batch_size, args.chunk_rows, args.chunks_in_memory, args.seed)
    finally:
        if not args.keep:
            path.unlink()


if __name__ == "__main__":
    main()
