"""Data-parallel training with ``torch.distributed`` when launched by ``torchrun``.

``torchrun --nproc-per-node N -m medseg train ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; each
process then trains a replica (gloo on CPU, NCCL on CUDA), gradients are averaged, and the global batch
of the plan is split across the ranks. Only rank 0 writes files.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from medseg.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) data-parallel run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def batch_slice(self, global_batch: int) -> tuple[int, int]:
        """Samples ``[lo, hi)`` of a global batch this rank computes (sizes differ by at most one)."""
        if global_batch < self.world_size:
            raise ConfigError(
                f"the batch size {global_batch} is smaller than the number of processes {self.world_size}; "
                "use fewer processes or a larger --batch-size"
            )
        base, extra = divmod(global_batch, self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks (in place; returns ``t``)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` on every rank (in place; returns ``t``)."""
        if self.enabled:
            dist.broadcast(t, src=0)
        return t

    def shutdown(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def launch_rank() -> int:
    """This process's rank before :func:`init_distributed` (``RANK`` set by ``torchrun``; 0 for one process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def init_distributed(device: str) -> DistContext:
    """Join the process group described by the environment (``torchrun``); single process otherwise.

    Args:
        device: ``cpu`` (gloo backend) or ``cuda`` (NCCL; rank ``r`` uses GPU ``LOCAL_RANK``).

    Returns:
        The context; ``initialized_here`` tells whether this call created the process group.
    """
    if dist.is_available() and dist.is_initialized():  # the caller set the process group up
        rank = dist.get_rank()
        return DistContext(
            rank=rank, world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", str(rank)))
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=4))
    logger.info("distributed training: rank %d of %d (%s)", rank, world, backend)
    return DistContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, initialized_here=True
    )
