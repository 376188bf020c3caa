"""A plain PyTorch training loop: AdamW, KL annealing, early stopping, LR on plateau, checkpoints."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from genailab.data.loader import MinibatchLoader
from genailab.errors import CheckpointError, ConfigError, TrainingDivergedError
from genailab.model.adversary import BatchDiscriminator
from genailab.model.vae import ConditionalVAE, LossOutput
from genailab.likelihood.sparse_counts import SparseCounts
from genailab.train.checkpoint import (
    apply_resumed_options,
    atomic_torch_save,
    check_checkpoint,
    check_resume,
    check_weights_fit,
    safe_torch_load,
)
from genailab.train.config import TrainConfig
from genailab.train.distributed import DistributedContext, distributed_context
from genailab.train.interrupt import LastFinishedEpoch
from genailab.train.schedules import EarlyStopping, kl_weight, one_cycle_lr, one_cycle_warmup_steps

logger = logging.getLogger(__name__)
_LARGE_BETA = 100.0  # a KL weight above this is named as the likely cause of a NaN/Inf loss

CHECKPOINT_FORMAT = "genailab-checkpoint"
CHECKPOINT_VERSION = 1
DIVERGENCE_CHECK_STEPS = 50  # accelerators: steps between reads of the non-finite-loss flag (each read syncs)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` gives CUDA when available, else CPU; other names are passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return DistributedContext().device(name)


def make_optimizer(parameters, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam or AdamW; the fused single-kernel implementation where this torch build has one."""
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    parameters = list(parameters)
    try:
        return optimizer_class(parameters, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # older torch, or a device without a fused kernel
        return optimizer_class(parameters, lr=config.lr, weight_decay=config.weight_decay)


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices) and switch deterministic kernels on or off.

    With ``deterministic`` on CUDA, cuBLAS also needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the
    environment before the process starts; it is set here when absent, which works if no CUDA
    work has run yet.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = False


class Trainer:
    """Fits a :class:`ConditionalVAE` on minibatch loaders.

    Parameters
    ----------
    model
        The model to train, already on its device or moved there by the trainer.
    config
        Training options.
    checkpoint_path
        Where resumable checkpoints go (written atomically every ``config.checkpoint_every`` epochs).
    checkpoint_extra
        Plain data stored in every checkpoint (e.g. the data schema), returned by :func:`load_checkpoint`.
    adversary
        Optional batch discriminator on the latent; the loaders must then carry batch codes as
        ``Batch.y``. The trainer owns its optimiser and steps it after (alternating mode) or with
        (gradient-reversal mode) the VAE.

    Notes
    -----
    Under ``torchrun`` the model is wrapped in DistributedDataParallel (see
    :mod:`genailab.train.distributed`); the loaders must then hold this rank's shard, and only
    rank 0 shows progress and writes checkpoints.
    """

    def __init__(
        self,
        model: ConditionalVAE,
        config: TrainConfig,
        *,
        checkpoint_path: str | Path | None = None,
        checkpoint_extra: dict | None = None,
        adversary: BatchDiscriminator | None = None,
    ):
        self.config = config
        self.dist = distributed_context()
        self.device = self.dist.device(config.device)
        self.model = model.to(self.device)
        self._ddp = None
        if self.dist.is_distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = torch.nn.parallel.DistributedDataParallel(_LossModule(self.model), device_ids=device_ids)
        self.adversary = adversary.to(self.device) if adversary is not None else None
        self.adversary_optimizer = (
            torch.optim.Adam(adversary.parameters(), lr=adversary.config.lr) if adversary is not None else None
        )
        self.optimizer = make_optimizer(model.parameters(), config)
        self.scheduler = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, factor=config.lr_factor, patience=config.lr_plateau_patience, min_lr=config.min_lr
            )
            if config.lr_plateau_patience is not None and config.lr_schedule_used == "plateau"
            else None
        )
        self.early_stopping = (
            EarlyStopping(config.early_stopping_patience, config.early_stopping_min_delta)
            if config.early_stopping_patience is not None
            else None
        )
        if config.checkpoint_every and checkpoint_path is None:
            raise ConfigError("checkpoint_every needs a checkpoint path (checkpoint_dir=...) to write checkpoints to.")
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.checkpoint_extra = checkpoint_extra or {}
        self.history: list[dict] = []
        self.start_epoch = 0
        self.stopped_early = False

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, train_loader: MinibatchLoader, val_loader: MinibatchLoader | None = None) -> list[dict]:
        """Train until ``config.epochs`` or early stopping; returns the per-epoch history.

        On Ctrl-C or SIGTERM the trainer goes back to the end of the last finished epoch (weights,
        optimiser, history), checkpoints it when it has a checkpoint path, and re-raises
        ``KeyboardInterrupt`` (see :mod:`genailab.train.interrupt`).
        """
        with LastFinishedEpoch(self) as self._last_epoch:
            return self._fit(train_loader, val_loader)

    def _fit(self, train_loader: MinibatchLoader, val_loader: MinibatchLoader | None) -> list[dict]:
        # the data-dependent defaults (epochs, schedules), from all ranks' training cells
        self.config = self.config.resolved(train_loader.indices.size * self.dist.world_size)
        cfg = self.config
        if self.dist.is_main:
            self._warn_if_warmup_outlasts_run()
        for loader in (train_loader, val_loader):  # on a GPU, an in-memory matrix that fits is copied there once
            if loader is not None and hasattr(loader, "preload"):
                loader.preload(self.device)
        epochs = range(self.start_epoch, cfg.epochs)
        if self.stopped_early:  # resumed from a run that had stopped: it is finished
            logger.info("The checkpoint's run stopped early after epoch %d; nothing to train.", self.start_epoch)
            epochs = range(0)
        show = cfg.progress and self.dist.is_main
        bar = tqdm(epochs, desc="training", unit="epoch", disable=None if show else True, leave=False)
        for epoch in bar:
            started = time.perf_counter()
            train = self._train_epoch(train_loader, epoch)
            record = {"epoch": epoch + 1, "kl_weight": train.pop("kl_weight"), **{f"train_{k}": v for k, v in train.items()}}
            if val_loader is not None:
                record.update({f"val_{k}": v for k, v in elbo_terms(self.model, val_loader, self.device).items()})
            record["lr"] = self.optimizer.param_groups[0]["lr"]
            record["seconds"] = time.perf_counter() - started
            self.history.append(record)
            monitored = record["val_elbo_loss"] if val_loader is not None else record["train_elbo_loss"]
            if self.dist.is_distributed:  # every rank must take the same LR and stopping decisions
                total = self.dist.all_reduce_sum(torch.tensor(monitored, device=self.device))
                monitored = total.item() / self.dist.world_size
            if self.scheduler is not None:
                self.scheduler.step(monitored)
            stop = self.early_stopping is not None and self.early_stopping.step(monitored, epoch + 1)
            bar.set_postfix(loss=f"{record['train_loss']:.4g}", monitored=f"{monitored:.4g}")
            logger.info("epoch %d: %s", epoch + 1, _format_record(record))
            self._check_parameters(epoch)
            self.start_epoch = epoch + 1
            self._last_epoch.finished()
            if cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0 and self.dist.is_main:
                self.save_checkpoint()
            if stop:
                self.stopped_early = True
                logger.info("Early stopping after epoch %d (best epoch %d).", epoch + 1, self.early_stopping.best_epoch)
                break
        bar.close()
        if cfg.checkpoint_every and self.start_epoch % cfg.checkpoint_every and self.checkpoint_path and self.dist.is_main:
            self.save_checkpoint()  # the last epoch too, so the checkpoint never lags the finished model
        if cfg.recalibrate_norm:  # after the checkpoint, which keeps the training state to resume from
            self._recalibrate_norm(train_loader)
        return self.history

    def _recalibrate_norm(self, loader: MinibatchLoader) -> None:
        """Recompute every batch norm's running statistics from one pass over the training cells
        under the final weights (dropout off, z drawn as in training, seeded), as equal-weight
        averages over the batches. With momentum 0.01 they trail the weights by about 100 steps, and
        a short run has only a few hundred: a default fit on 400 cells decoded worse than each gene's
        mean (MSE 5.46 against 1.19; 0.68 recalibrated). Batch norms that stay in evaluation mode
        (a query model's frozen reference) keep their statistics. The checkpoint keeps the training
        statistics: a resumed run trains on from them and recomputes these at its end."""
        norms = [m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                 and m.track_running_stats]  # fmt: skip
        if not norms:
            return
        kept = [(norm.momentum, {k: v.clone() for k, v in norm.state_dict().items()}) for norm in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average
        self.model.train()
        for module in self.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.eval()
        loader.set_epoch(0)
        with torch.no_grad(), torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.config.seed)
            for batch in loader:
                batch = batch.to(self.device)
                self.model.loss(batch.x, batch.c, kl_weight=1.0, x_sparse=batch.x_sparse)
        for norm, (momentum, state) in zip(norms, kept):
            norm.momentum = momentum
            if int(norm.num_batches_tracked) == 0:  # never updated: frozen in evaluation mode
                norm.load_state_dict(state)
        self.model.eval()

    def _warn_if_warmup_outlasts_run(self) -> None:
        """Warn when a linear KL warm-up set longer than the run leaves the KL weight below 1 at the end."""
        cfg = self.config
        if cfg.kl_schedule != "linear" or cfg.kl_warmup_epochs <= cfg.epochs:
            return
        logger.warning(
            "kl_warmup_epochs=%g is longer than the run (epochs=%d): the KL weight reaches only %.2f at the end, so the "
            "model never trains on the full ELBO that early stopping and get_elbo score. Give kl_warmup_epochs of at "
            "most %d, or leave it unset (then %g of the run).",
            cfg.kl_warmup_epochs, cfg.epochs, kl_weight(float(cfg.epochs), warmup_epochs=cfg.kl_warmup_epochs),
            cfg.epochs, cfg.kl_warmup_fraction,
        )  # fmt: skip

    def _train_epoch(self, loader: MinibatchLoader, epoch: int) -> dict[str, float]:
        """One pass over ``loader``; the running sums and the divergence flag stay on the device.

        The host reads the flag before every update on the CPU (a NaN batch never reaches the
        weights) and every ``DIVERGENCE_CHECK_STEPS`` steps on accelerators, where each read is a
        synchronisation; the sums are read once, at the end of the epoch.
        """
        cfg = self.config
        self.model.train()
        loader.set_epoch(epoch)
        n_batches = len(loader)
        check_every = 1 if self.device.type == "cpu" else DIVERGENCE_CHECK_STEPS
        sums = torch.zeros(4, dtype=_sum_dtype(self.device), device=self.device)  # objective, rec., KL, adversary
        watch = _DivergenceWatch(self.device)
        n_cells = 0
        weight = 1.0
        adversary_warmup = cfg.short_run_warmup(self.adversary.config.warmup_epochs) if self.adversary is not None else 0
        for step, batch in enumerate(loader):
            batch = batch.to(self.device)
            if cfg.lr_schedule == "one_cycle":
                self._set_lr(epoch * n_batches + step, cfg.epochs * n_batches)
            weight = kl_weight(
                epoch + step / n_batches,
                schedule=cfg.kl_schedule,
                warmup_epochs=cfg.kl_warmup_epochs,
                total_epochs=cfg.epochs,
                n_cycles=cfg.kl_cycles,
            )
            out = self._loss(batch, weight)
            objective = out.loss
            if self.adversary is not None:
                adversary_weight = self.adversary.config.weight_at(epoch + step / n_batches, warmup_epochs=adversary_warmup)
                objective = objective + self.adversary.encoder_loss(out.z, batch.y, adversary_weight)
            watch.record(objective, step)
            if (step + 1) % check_every == 0:
                self._raise_if_diverged(watch, epoch, n_batches)
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            adversary_loss = self._adversary_step(out.z, batch.y) if self.adversary is not None else None
            b = batch.x.shape[0]
            terms = [out.loss.detach() * b, out.reconstruction.detach().sum(), out.kl.detach().sum(),
                     adversary_loss * b if adversary_loss is not None else out.kl.new_zeros(())]
            sums += torch.stack(terms).to(sums.dtype)
            n_cells += b
        self._raise_if_diverged(watch, epoch, n_batches)
        sums = self.dist.all_reduce_sum(torch.cat([sums, sums.new_full((1,), n_cells)]))  # summed over ranks
        loss, rec, kl, adversary = (sums[:4] / sums[4].clamp_min(1)).tolist()  # the epoch's one read of the sums
        record = {"loss": loss, "reconstruction": rec, "kl": kl, "elbo_loss": rec + kl, "kl_weight": weight}
        if self.adversary is not None:
            record["adversary_loss"] = adversary
        return record

    def _set_lr(self, step: int, total_steps: int) -> None:
        """The one-cycle schedule's rate for this step (a pure function of the step, so resuming continues it)."""
        cfg = self.config
        lr = one_cycle_lr(step, total_steps, warmup_steps=one_cycle_warmup_steps(total_steps, cfg.lr_warmup_fraction),
                          start=cfg.lr, peak=cfg.one_cycle_peak * cfg.lr, end=cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _raise_if_diverged(self, watch: _DivergenceWatch, epoch: int, n_batches: int) -> None:
        """Read the divergence flag back (one synchronisation); raise at the first non-finite loss."""
        bad = watch.first_bad()
        if bad is not None:
            step, value = bad
            raise TrainingDivergedError(
                f"The loss became {value} at epoch {epoch + 1}, batch {step + 1} of {n_batches}. " + self._divergence_hint()
            )

    def _loss(self, batch, weight: float) -> LossOutput:
        """The VAE's loss on a batch; through DistributedDataParallel when running under torchrun,
        under bfloat16 autocast on CUDA with ``precision="bfloat16"`` (the likelihood upcasts to float32)."""
        bf16 = self.config.precision == "bfloat16" and self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=bf16):
            if self._ddp is None:
                return self.model.loss(batch.x, batch.c, kl_weight=weight, x_sparse=batch.x_sparse)
            loss, reconstruction, kl, z = self._ddp(batch.x, batch.c, weight, batch.x_sparse)
        return LossOutput(loss=loss, reconstruction=reconstruction, kl=kl, z=z)

    def _check_parameters(self, epoch: int) -> None:
        """Stop before NaN/Inf weights (e.g. from the epoch's last step) end up in a checkpoint or a model."""
        named = list(self.model.named_parameters())
        finite = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()  # one read for all
        bad = [name for (name, _), ok in zip(named, finite) if not ok]
        if bad:
            raise TrainingDivergedError(
                f"Weights {bad[:3]} became NaN or infinite during epoch {epoch + 1}. " + self._divergence_hint()
            )

    def _divergence_hint(self) -> str:
        config = self.model.config
        beta = getattr(config, "beta", None) or getattr(getattr(config, "vae", None), "beta", 1.0)
        if beta > _LARGE_BETA:  # the KL term, not the step size, is what overflows
            return (
                f"beta={beta:g} weights the KL term so heavily that the loss overflows; lower `beta` (1 is the "
                "standard VAE, 0.1-10 the usual range). The learning rate is not the cause."
            )
        hint = (
            "Lower the learning rate (`lr`), check the input for extreme values, or use a count model on raw "
            "counts" + ("." if self.config.grad_clip is not None else "; in Python, turn gradient clipping back on "
                        "(leave grad_clip at its default).")
        )
        if self.checkpoint_path is not None and self.checkpoint_path.is_file():
            hint += f" The last good checkpoint, {self.checkpoint_path}, is kept; resume from it with a lower lr."
        return hint

    def _adversary_step(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Update the discriminator; returns its classification loss on this batch (detached)."""
        if self.adversary.config.mode == "gradient_reversal":
            self._average_adversary_gradients()  # its gradient came with the VAE's backward pass
            self.adversary_optimizer.step()
            self.adversary_optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                return self.adversary.classification_loss(z.detach(), labels)
        self.adversary_optimizer.zero_grad(set_to_none=True)
        loss = self.adversary.classification_loss(z.detach(), labels)
        loss.backward()
        self._average_adversary_gradients()
        self.adversary_optimizer.step()
        return loss.detach()

    def _average_adversary_gradients(self) -> None:
        """Under torchrun, every rank steps the discriminator with the gradient averaged over ranks
        (DistributedDataParallel averages the VAE's; the discriminator sits outside it)."""
        if not self.dist.is_distributed:
            return
        for parameter in self.adversary.parameters():
            if parameter.grad is not None:
                parameter.grad = self.dist.all_reduce_sum(parameter.grad) / self.dist.world_size

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "epoch": self.start_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "train_config": self.config.to_dict(),
            "model_config": self.model.config.to_dict(),
            "rng_cpu": torch.get_rng_state(),
            "extra": self.checkpoint_extra,
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.early_stopping is not None:
            state["early_stopping"] = self.early_stopping.state_dict()
        if self.adversary is not None:
            state["adversary"] = self.adversary.state_dict()
            state["adversary_optimizer"] = self.adversary_optimizer.state_dict()
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        return state

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write a resumable checkpoint atomically; returns its path."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise CheckpointError("No checkpoint path was given to the trainer.")
        atomic_torch_save(self.state_dict(), path)
        return path

    def load_state_dict(self, state: dict, *, source: str | Path = "The checkpoint") -> None:
        """Restore everything a checkpoint holds, so training continues the same loss curve.

        A checkpoint that is damaged or does not fit this model and configuration is a
        :class:`CheckpointError` naming ``source``; options that may change on resume (lr, epochs,
        schedules...) take effect (see :mod:`genailab.train.checkpoint`).
        """
        check_checkpoint(state, source)
        check_resume(state, source, model_config=self.model.config.to_dict(), train_config=self.config.to_dict())
        check_weights_fit(state["model"], self.model.state_dict(), source)
        self.model.load_state_dict(state["model"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{source}: the optimiser state does not fit this model ({exc}); it is damaged.") from exc
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.early_stopping is not None and "early_stopping" in state:
            self.early_stopping.load_state_dict(state["early_stopping"])
        if (self.adversary is not None) != ("adversary" in state):
            written = "with" if "adversary" in state else "without"
            raise CheckpointError(f"{source} was written {written} a batch adversary; resume it with a model built "
                                  f"{written} one (adversarial_key and adversary as when it was written).")
        if self.adversary is not None:
            check_weights_fit(state["adversary"], self.adversary.state_dict(), source, what="adversary")
            self.adversary.load_state_dict(state["adversary"])
            self.adversary_optimizer.load_state_dict(state["adversary_optimizer"])
        self.history = list(state["history"])
        self.start_epoch = int(state["epoch"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        changed = apply_resumed_options(state, self.config, optimizer=self.optimizer, scheduler=self.scheduler,
                                        early_stopping=self.early_stopping)  # fmt: skip
        self.stopped_early = self.early_stopping is not None and self.early_stopping.stopped
        if changed:
            logger.warning("Resuming from %s with changed options: %s.", source, "; ".join(changed))


class _LossModule(torch.nn.Module):
    """``model.loss`` as ``forward``, so DistributedDataParallel can average its gradients."""

    def __init__(self, model: ConditionalVAE):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, c: torch.Tensor | None, kl_weight: float, x_sparse: SparseCounts | None):
        out = self.model.loss(x, c, kl_weight=kl_weight, x_sparse=x_sparse)
        return out.loss, out.reconstruction, out.kl, out.z


def load_checkpoint(path: str | Path) -> dict:
    """Read and check a trainer checkpoint (no code runs from the file)."""
    state = safe_torch_load(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a genailab training checkpoint.")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer genailab (checkpoint version {state['version']}); upgrade genailab."
        )
    return check_checkpoint(state, path)


@torch.no_grad()
def elbo_terms(model: ConditionalVAE, loader: Iterable, device: torch.device | None = None) -> dict[str, float]:
    """Mean per-cell reconstruction, KL and negative ELBO (reconstruction + KL) over a loader;
    the sums stay on the device and are read once."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    sums = torch.zeros(2, dtype=_sum_dtype(device), device=device)
    n_cells = 0
    for batch in loader:
        batch = batch.to(device)
        out = model.loss(batch.x, batch.c, x_sparse=batch.x_sparse)
        sums += torch.stack([out.reconstruction.sum(), out.kl.sum()]).to(sums.dtype)
        n_cells += batch.x.shape[0]
    model.train(was_training)
    rec, kl = (sums / max(n_cells, 1)).tolist()
    return {"reconstruction": rec, "kl": kl, "elbo_loss": rec + kl}


class _DivergenceWatch:
    """The first step whose loss was NaN or infinite, and that loss, kept on the device."""

    def __init__(self, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.int64, device=device)
        self.value = torch.zeros((), dtype=_sum_dtype(device), device=device)

    def record(self, loss: torch.Tensor, step: int) -> None:
        """Note ``loss`` of ``step`` without reading it on the host."""
        loss = loss.detach().to(self.value.dtype)
        first = torch.logical_and(~torch.isfinite(loss), self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.value = torch.where(first, loss, self.value)

    def first_bad(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite loss so far, or None (reads the device)."""
        step, value = torch.stack([self.step.to(self.value.dtype), self.value]).tolist()
        return None if step < 0 else (int(step), value)


def _sum_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums over an epoch of cells; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _format_record(record: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}" for k, v in record.items())
