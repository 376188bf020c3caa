"""Data-parallel training under ``torchrun``: the process group, each rank's shard, metric sums.

``torchrun --nproc_per_node N ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; genailab then joins the
process group (gloo on CPU, NCCL on GPUs), gives every rank a fixed, equal-sized shard of the
training cells, wraps the model in DistributedDataParallel (gradients averaged over ranks) and lets
only rank 0 log, checkpoint and save. Each rank's ``batch_size`` is its own, so the effective
batch is ``batch_size * world_size``.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from genailab.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a data-parallel run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the one process that logs, checkpoints and saves."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The device of this rank: with ``"auto"`` and GPUs, one GPU per local rank."""
        if name == "auto":
            name = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"device={name!r} is not a torch device; use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from exc
        if device.type not in ("cpu", "cuda"):  # mps, xpu, meta...: torch parses them, genailab does not run there
            raise ConfigError(f"device={name!r} is not supported: genailab runs on 'cpu' or CUDA ('cuda', 'cuda:N'); "
                              "use 'auto' to take a GPU when there is one.")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} asks for CUDA, which this machine or torch build lacks; use 'auto' or 'cpu'.")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r} names GPU {device.index}, but this machine has "
                              f"{torch.cuda.device_count()} (cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
        return device

    def shard(self, indices: np.ndarray) -> np.ndarray:
        """This rank's fixed share of ``indices``: every world_size-th row, all shards equal in size
        (up to world_size - 1 rows are left out) so that every rank takes the same number of steps."""
        if not self.is_distributed:
            return indices
        per_rank = indices.size // self.world_size
        return indices[self.rank :: self.world_size][:per_rank]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (in place on a copy); identity when not distributed."""
        if not self.is_distributed:
            return tensor
        reduced = tensor.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced


def distributed_context() -> DistributedContext:
    """Read the torchrun environment and join the process group once; rank 0 of 1 otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        atexit.register(_leave_process_group)  # left to interpreter shutdown, gloo's threads can abort the exit
        logger.info("Joined a %s process group as rank %d of %d.", backend, rank, world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank)


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
