"""GPU throughput: genailab training cells/s at batch 128 / 1,024 / 4,096 on 20k and 1M cells x 2,000 genes.

One prepared script of at most about 10 minutes for a machine with a CUDA GPU:

    python benchmarks/gpu.py                        # both sizes, float32 and bfloat16 autocast
    python benchmarks/gpu.py --sizes 20000          # the small case only
    .venv-scvi/bin/python benchmarks/gpu.py         # adds scvi-tools' rows on the same GPU (see README, Speed)

The protocol is the speed benchmark's (ZINB, 2 x 128 hidden, latent 10). The 20k cells are
simulated; the 1M-cell matrix repeats them 50 times (throughput depends on the shape and the
density, not on which cells repeat), which keeps the set-up to a minute. The trainer copies the
CSR matrix to the GPU once (it fits) and gathers every minibatch there. Each row is the second of
two training epochs over a random subset of ``--steps`` batches (the first compiles kernels and
warms the caching allocator), with the peak GPU memory of that run. scvi-tools, when importable,
trains the same architecture on the 20k cells for two epochs per batch size (its own loader). The
script stops starting new rows after ``--budget`` seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np
import scipy.sparse as sp
import torch

from genailab.data import simulate
from genailab.data.loader import MinibatchLoader
from genailab.model.vae import CVAE_ZINB
from genailab.train import TrainConfig, Trainer, seed_everything

BATCH_SIZES = (128, 1024, 4096)


def genailab_row(matrix: sp.csr_matrix, batch_size: int, steps: int, precision: str) -> tuple[float, float]:
    """(training cells/s, peak GPU memory GiB) of one epoch of ``steps`` batches, after one more."""
    seed_everything(0)
    model = CVAE_ZINB(input_dim=matrix.shape[1], latent_dim=10, hidden_dims=[128, 128])
    n_cells = min(steps * batch_size, matrix.shape[0])
    rows = np.sort(np.random.default_rng(0).choice(matrix.shape[0], size=n_cells, replace=False))
    loader = MinibatchLoader(matrix, indices=rows, batch_size=batch_size, seed=0)
    config = TrainConfig(epochs=2, batch_size=batch_size, device="cuda", precision=precision, progress=False,
                         validation_fraction=0.0, early_stopping_patience=None, lr_plateau_patience=None,
                         recalibrate_norm=False)  # the training steps alone
    torch.cuda.reset_peak_memory_stats()
    history = Trainer(model, config).fit(loader)  # the epoch's figures are read back once, at its end
    return n_cells / history[-1]["seconds"], torch.cuda.max_memory_allocated() / 2**30


def scvi_row(adata, batch_size: int) -> float:
    """scvi-tools' training cells/s on the GPU: two epochs, their mean (set-up excluded)."""
    import scvi

    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(adata, layer="counts")
    model = scvi.model.SCVI(adata, n_hidden=128, n_layers=2, n_latent=10, gene_likelihood="zinb")
    started = time.perf_counter()
    model.train(max_epochs=2, batch_size=batch_size, train_size=1.0, accelerator="gpu", devices=1,
                enable_progress_bar=False, early_stopping=False)
    return 2 * adata.n_obs / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,1000000", help="Comma-separated cell counts (2,000 genes).")
    parser.add_argument("--steps", type=int, default=200, help="Batches per timed epoch (fewer if the data is smaller).")
    parser.add_argument("--budget", type=float, default=540.0, help="Seconds after which no new row starts.")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("No CUDA device: this benchmark needs a GPU.")
    started = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; ZINB, 2 x 128 hidden, latent 10")
    base = simulate(20_000, 2_000, n_cell_types=8, n_batches=2, likelihood="zinb", seed=0)
    counts = sp.csr_matrix(base.layers["counts"], dtype=np.float32)
    for n_cells in [int(v) for v in args.sizes.split(",") if v]:
        matrix = counts if n_cells <= counts.shape[0] else sp.vstack([counts] * -(-n_cells // counts.shape[0]), format="csr")
        matrix = matrix[:n_cells]
        print(f"\n{n_cells:,} cells x 2,000 genes, {matrix.nnz / n_cells:.0f} stored counts per cell, "
              f"{12 * matrix.nnz / 2**30:.1f} GiB on the GPU as CSR")
        for precision in ("float32", "bfloat16"):
            for batch_size in BATCH_SIZES:
                if time.perf_counter() - started > args.budget:
                    print("  time budget spent: no more rows")
                    return
                speed, peak = genailab_row(matrix, batch_size, args.steps, precision)
                print(f"  genailab {precision:8s} batch {batch_size:5d}: {speed:12,.0f} cells/s   "
                      f"peak GPU memory {peak:6.2f} GiB", flush=True)
        del matrix
        torch.cuda.empty_cache()
    if importlib.util.find_spec("scvi") is None:
        print("\nscvi-tools is not importable here: no scvi-tools rows")
        return
    print("\nscvi-tools on the same GPU, 20,000 cells:")
    for batch_size in BATCH_SIZES:
        if time.perf_counter() - started > args.budget:
            print("  time budget spent: no more rows")
            return
        print(f"  scvi-tools batch {batch_size:5d}: {scvi_row(base.copy(), batch_size):12,.0f} cells/s", flush=True)


if __name__ == "__main__":
    main()
