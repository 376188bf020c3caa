"""Training and inference throughput of genailab (issue: speed and scale), optionally beside scVI.

Prints cells/s for: genailab training (ZINB, 2x128 hidden, latent 10, batch 128 by default), the
bare dense forward+backward of the same network's linear layers (the ceiling), inference (latent
and denoised expression), per-epoch cost at several sizes, and scvi-tools' training when it is
importable. Run:

    python benchmarks/speed.py                      # 20,000 cells x 2,000 genes
    python benchmarks/speed.py --scaling 10000,100000
    python benchmarks/speed.py --profile            # where the milliseconds of a training step go
    python benchmarks/speed.py --profile-inference  # where the time of denoised expression goes
    python benchmarks/speed.py --compile --cells 5000 --threads 1   # torch.compile of the dense step vs eager
    .venv-scvi/bin/python benchmarks/speed.py       # an environment with scvi-tools adds its row (see README)

Training epochs, inference calls and scvi-tools' epochs alternate round by round, and the ratios
(inference / training, genailab / scvi-tools) are taken within each round before the median, so
that a shared machine's drifting load hits every side alike. Each is also given per CPU second of
the process (``time.process_time``), which the other jobs on a shared machine inflate less than
the wall clock.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from genailab import VAE
from genailab.data import simulate
from genailab.data.loader import MinibatchLoader
from genailab.model.vae import CVAE_ZINB
from genailab.train import TrainConfig, Trainer, seed_everything


def bare_network_throughput(n_genes: int, hidden: int, latent: int, batch_size: int, steps: int = 150) -> float:
    """Cells/s of forward+backward through the same linear layers, with nothing else."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(n_genes, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
    to_latent = nn.Linear(hidden, 2 * latent)  # mean and log-variance heads
    decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
    heads = nn.Linear(hidden, 2 * n_genes)  # expression proportions and dropout logits
    x = torch.rand(batch_size, n_genes)
    def step():
        h = to_latent(encoder(x))[:, :latent]
        heads(decoder(h)).sum().backward()
    for _ in range(10):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - started)


class GenailabTraining:
    """genailab's trainer on the ZINB model (2x128 hidden, latent 10), one epoch at a time."""

    def __init__(self, adata, batch_size: int):
        seed_everything(0)
        self.model = CVAE_ZINB(input_dim=adata.n_vars, latent_dim=10, hidden_dims=[128, 128])
        self.loader = MinibatchLoader(adata.layers["counts"], batch_size=batch_size, seed=0)
        self.config = TrainConfig(epochs=1, batch_size=batch_size, progress=False, validation_fraction=0.0,
                                  early_stopping_patience=None, lr_plateau_patience=None,
                                  recalibrate_norm=False)  # the training steps alone, one epoch per call
        self.n_cells = adata.n_obs

    def epoch(self) -> tuple[float, float]:
        """Cells per second and per CPU second of one epoch."""
        cpu = time.process_time()
        history = Trainer(self.model, self.config).fit(self.loader)
        return self.n_cells / history[-1]["seconds"], self.n_cells / (time.process_time() - cpu)


def genailab_training_throughput(adata, *, epochs: int, batch_size: int) -> float:
    """Median cells/s over ``epochs`` epochs, after one warm-up epoch."""
    training = GenailabTraining(adata, batch_size)
    training.epoch()
    return float(np.median([training.epoch()[0] for _ in range(epochs)]))


class InferenceCalls:
    """Whole-AnnData inference (data checks included) of a VAE with the benchmark's architecture,
    trained one epoch: cells/s of one call of ``get_latent`` or ``get_normalized_expression``."""

    def __init__(self, adata):
        self.model = VAE(adata, likelihood="zinb", layer="counts", latent_dim=10, hidden_dims=(128, 128))
        self.model.fit(epochs=1, progress=False, validation_fraction=0.0)
        self.n_cells = adata.n_obs

    def speed(self, name: str) -> tuple[float, float]:
        """Cells per second and per CPU second of one call."""
        call = {"latent": self.model.get_latent, "denoised": self.model.get_normalized_expression}[name]
        started, cpu = time.perf_counter(), time.process_time()
        call()
        return self.n_cells / (time.perf_counter() - started), self.n_cells / (time.process_time() - cpu)


def profile_inference(adata, *, calls: int = 3) -> None:
    """Print where the time of ``get_normalized_expression`` goes: torch.profiler's operators by
    self CPU time, then the Python functions (cProfile) by their own time."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    inference = InferenceCalls(adata)
    started = time.perf_counter()
    np.empty(adata.shape, dtype=np.float32).fill(0.0)  # what a fresh result costs before any value is computed
    first_touch = time.perf_counter() - started
    inference.speed("denoised")
    speeds = [inference.speed("denoised")[0] for _ in range(calls)]
    call = adata.n_obs / np.median(speeds)
    print(f"denoised expression, {adata.n_obs} cells: {np.median(speeds):.0f} cells/s (median of {calls} calls, "
          f"{1e3 * call:.0f} ms each)")
    print(f"writing a fresh {adata.n_obs} x {adata.n_vars} float32 array once, right after training (its page "
          f"faults): {1e3 * first_touch:.0f} ms")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            inference.speed("denoised")
    print(f"operators by self CPU time (per call = total / {calls}):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    profiler = cProfile.Profile()
    profiler.runcall(inference.speed, "denoised")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def profile_steps(adata, *, batch_size: int, steps: int = 40, warmup: int = 10) -> None:
    """Print where a training step's time goes: the phases (loader, forward + loss, backward,
    optimiser) timed around each step, then torch.profiler's operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    seed_everything(0)
    model = CVAE_ZINB(input_dim=adata.n_vars, latent_dim=10, hidden_dims=[128, 128])
    config = TrainConfig(epochs=1, batch_size=batch_size)
    optimizer = Trainer(model, config).optimizer
    loader = iter(MinibatchLoader(adata.layers["counts"], batch_size=batch_size, seed=0))
    phases = {"loader": 0.0, "forward + loss": 0.0, "backward": 0.0, "clip + optimiser": 0.0}

    def step(timed: bool) -> None:
        marks = [time.perf_counter()]
        with record_function("loader"):
            batch = next(loader)
        marks.append(time.perf_counter())
        with record_function("forward + loss"):
            loss = model.loss(batch.x, batch.c, x_sparse=batch.x_sparse).loss
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        with record_function("backward"):
            loss.backward()
        marks.append(time.perf_counter())
        with record_function("clip + optimiser"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
        marks.append(time.perf_counter())
        if timed:
            for name, a, b in zip(phases, marks, marks[1:]):
                phases[name] += b - a

    model.train()
    for _ in range(warmup):
        step(False)
    for _ in range(steps):
        step(True)
    total = sum(phases.values())
    print(f"one training step, batch {batch_size} (mean of {steps} steps): {1e3 * total / steps:.1f} ms")
    for name, seconds in phases.items():
        print(f"  {name:<18} {1e3 * seconds / steps:7.2f} ms  {seconds / total:6.1%}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(False)
    print(f"operators by self CPU time (per step = total / {steps}):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def _dense_step(model, x: torch.Tensor):
    """The training step's dense work as plain differentiable torch, for ``torch.compile`` to fuse
    with its backward: encoder, reparameterised sample, decoder, the ZINB log-likelihood without the
    count terms (those run on the sparse entries, outside), and the KL. Returns (dense NLL, KL, theta), each per cell."""
    import torch.nn.functional as F

    from genailab.model.vae import gaussian_kl

    qz_mean, qz_var = model.encode(x)
    z = qz_mean + qz_var.sqrt() * torch.randn_like(qz_mean)
    library = x.sum(1, keepdim=True)
    hidden = model.decoder(z)
    head = model.head
    logits, zi = head.scale(hidden), head.dropout_logits(hidden)  # (B, G) each
    theta = torch.exp(head.log_theta(hidden, None))  # (G,)
    log_mu = torch.log_softmax(logits, -1) + torch.log(library.clamp_min(1e-30))
    log1p_ratio = torch.log1p(torch.exp(log_mu) / theta)  # log((theta + mu) / theta)
    ll_nb = x * (log_mu - log1p_ratio) - theta * log1p_ratio
    ll = torch.where(x == 0, zi + F.softplus(-theta * log1p_ratio - zi), ll_nb) - F.softplus(zi)
    return -ll.sum(-1), gaussian_kl(qz_mean, qz_var), theta


def compile_comparison(adata, *, batch_size: int, epochs: int) -> None:
    """Cells/s of the eager training step (the fused likelihood) and of the same step with its
    dense part compiled by ``torch.compile`` (set ``TORCHINDUCTOR_CACHE_DIR`` to keep the compiled
    code between runs), epoch by epoch in alternation, with the compiled run's first epoch (which
    holds the compile time) apart."""
    from genailab.likelihood.fused_nll import _count_terms_per_cell
    from genailab.train.trainer import make_optimizer

    runs = {}
    for mode in ("eager", "compiled"):
        seed_everything(0)
        model = CVAE_ZINB(input_dim=adata.n_vars, latent_dim=10, hidden_dims=[128, 128]).train()
        dense = torch.compile(_dense_step, dynamic=False) if mode == "compiled" else None
        runs[mode] = (model, make_optimizer(model.parameters(), TrainConfig(epochs=1)), dense,
                      MinibatchLoader(adata.layers["counts"], batch_size=batch_size, seed=0))

    def epoch(mode: str, number: int) -> tuple[float, float]:
        """(seconds of the epoch, loss of its last step)."""
        model, optimizer, dense, loader = runs[mode]
        loader.set_epoch(number)
        started = time.perf_counter()
        for batch in loader:
            if dense is None:
                loss = model.loss(batch.x, None, x_sparse=batch.x_sparse).loss
            else:
                nll, kl, theta = dense(model, batch.x)
                loss = torch.mean(nll - _count_terms_per_cell(batch.x, theta, batch.x_sparse) + kl)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
        return time.perf_counter() - started, loss.item()

    first = {mode: epoch(mode, 0)[0] for mode in runs}
    print(f"first epoch: eager {first['eager']:.1f} s, compiled {first['compiled']:.1f} s (compilation included)")
    rounds = [{mode: epoch(mode, number) for mode in runs} for number in range(1, epochs + 1)]
    for mode in runs:
        speeds = ", ".join(f"{adata.n_obs / r[mode][0]:.0f}" for r in rounds)
        print(f"{mode:9s} cells/s of epochs 2..{epochs + 1}: {speeds}; last loss {rounds[-1][mode][1]:.1f}")
    ratios = ", ".join(f"{r['eager'][0] / r['compiled'][0]:.2f}" for r in rounds)
    print(f"compiled / eager speed per round: {ratios}", flush=True)


class ScviTraining:
    """scvi-tools' SCVI with the same architecture and likelihood, one epoch at a time; None without scvi-tools."""

    def __init__(self, adata, batch_size: int):
        import scvi

        scvi.settings.seed = 0
        scvi.model.SCVI.setup_anndata(adata, layer="counts")
        self.model = scvi.model.SCVI(adata, n_hidden=128, n_layers=2, n_latent=10, gene_likelihood="zinb")
        self.batch_size = batch_size
        self.n_cells = adata.n_obs

    def epoch(self) -> tuple[float, float]:
        """Cells per second and per CPU second of one epoch."""
        started, cpu = time.perf_counter(), time.process_time()
        self.model.train(max_epochs=1, batch_size=self.batch_size, train_size=1.0, accelerator="cpu",
                         enable_progress_bar=False, early_stopping=False)
        return self.n_cells / (time.perf_counter() - started), self.n_cells / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per tool, after one warm-up each")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scaling", default="", help="comma-separated cell counts for the per-epoch cost")
    parser.add_argument("--profile", action="store_true", help="only profile a training step")
    parser.add_argument("--profile-inference", action="store_true", help="only profile denoised expression")
    parser.add_argument("--compile", action="store_true", help="only compare the eager and the compiled training step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.profile or args.profile_inference:
        adata = simulate(min(args.cells, 20_000), args.genes, n_cell_types=8, n_batches=2, likelihood="zinb", seed=0)
        profile_steps(adata, batch_size=args.batch_size) if args.profile else profile_inference(adata)
        return

    adata = simulate(args.cells, args.genes, n_cell_types=8, n_batches=2, likelihood="zinb", seed=0)
    if args.compile:
        compile_comparison(adata, batch_size=args.batch_size, epochs=args.epochs)
        return
    density = adata.layers["counts"].nnz / (adata.n_obs * adata.n_vars)
    print(f"data: {args.cells} cells x {args.genes} genes, {density:.1%} non-zero; torch threads {args.threads}")
    ours = GenailabTraining(adata, args.batch_size)
    inference = InferenceCalls(adata)
    try:
        reference = ScviTraining(adata.copy(), args.batch_size)
    except ImportError:
        reference = None

    def one_round() -> dict[str, tuple[float, float]]:
        speeds = {"training": ours.epoch(), "latent": inference.speed("latent"), "denoised": inference.speed("denoised")}
        speeds["scvi-tools"] = reference.epoch() if reference is not None else (np.nan, np.nan)
        return speeds

    one_round()  # warm-up
    rounds = [one_round() for _ in range(args.epochs)]
    # [0]: per second of the wall clock, [1]: per CPU second
    median = {name: [float(np.median([r[name][k] for r in rounds])) for k in (0, 1)] for name in rounds[0]}
    ratio = {name: [float(np.median([r[name][k] / r["training"][k] for r in rounds])) for k in (0, 1)] for name in rounds[0]}
    bare = bare_network_throughput(args.genes, 128, 10, args.batch_size)
    print(f"genailab training      {median['training'][0]:10.0f} cells/s   (median of {args.epochs} epochs; "
          f"{median['training'][1]:.0f} per CPU second)")  # fmt: skip
    print(f"bare network fwd+bwd   {bare:10.0f} cells/s   (genailab reaches {median['training'][0] / bare:.0%} of it)")
    for name in ("latent", "denoised"):
        per_round = ", ".join(f"{r[name][0] / r['training'][0]:.1f}" for r in rounds)
        print(f"inference: {name:<11} {median[name][0]:10.0f} cells/s   ({ratio[name][0]:.1f}x training; per round "
              f"{per_round}; per CPU second {median[name][1]:.0f}, {ratio[name][1]:.1f}x training)")  # fmt: skip
    if reference is None:
        print("scvi-tools not importable: run with an environment that has it for the side-by-side rows")
    else:
        print(f"scvi-tools training    {median['scvi-tools'][0]:10.0f} cells/s   (genailab is {1 / ratio['scvi-tools'][0]:.2f}x; "
              f"per CPU second {1 / ratio['scvi-tools'][1]:.2f}x)")  # fmt: skip
        ratios = ", ".join(f"{r['training'][0] / r['scvi-tools'][0]:.2f}" for r in rounds)
        print(f"per-epoch ratios genailab / scvi-tools, in alternation: {ratios}")
    for n in [int(v) for v in args.scaling.split(",") if v]:
        big = simulate(n, args.genes, n_cell_types=8, n_batches=2, likelihood="zinb", seed=1)
        speed = genailab_training_throughput(big, epochs=1, batch_size=args.batch_size)
        print(f"scaling: {n:>9} cells  {n / speed:8.1f} s/epoch  {speed:8.0f} cells/s")


if __name__ == "__main__":
    main()
