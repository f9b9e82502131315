"""Where this process stands among the processes ``torchrun`` started: rank, world size, process group.

``torchrun --nnodes N --nproc-per-node M -m medseg ...`` starts ``N * M`` processes and sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in each; a plain ``medseg`` command is rank 0 of 1. Training splits the
global batch across ranks and averages gradients (:mod:`medseg.training.distributed`); prediction splits the
cases of a folder (:mod:`medseg.inference.shards`) and only needs a barrier at the end. Both read the
environment through the helpers here, the one place that does.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from medseg.errors import ConfigError

logger = logging.getLogger(__name__)

#: How long a collective (a barrier) waits for the slowest rank before failing.
DEFAULT_TIMEOUT = datetime.timedelta(hours=4)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) group of ranks."""

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


def launch_world_size() -> int:
    """How many processes the launcher started (``WORLD_SIZE`` set by ``torchrun``; 1 for a plain command)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def launch_rank() -> int:
    """This process's rank before :func:`init_distributed` (``RANK`` set by ``torchrun``; 0 for one process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launch_world_size() > 1 else 0


def launch_local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``; the rank itself when unset): which GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", str(launch_rank())))


def init_distributed(
    device: str, backend: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> DistContext:
    """Join the process group described by the environment (``torchrun``); single process otherwise.

    Args:
        device: ``cpu`` (gloo backend) or ``cuda`` (NCCL; rank ``r`` uses GPU ``LOCAL_RANK``).
        backend: the backend to use whatever the device (``gloo`` for a group that only meets at barriers).
        timeout: how long a collective waits for the slowest rank.

    Returns:
        The context; ``initialized_here`` tells whether this call created the process group.
    """
    if dist.is_available() and dist.is_initialized():  # the caller set the process group up
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=launch_local_rank())
    world = launch_world_size()
    if world <= 1:
        return DistContext()
    rank, local_rank = launch_rank(), launch_local_rank()
    backend = backend or ("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=timeout)
    logger.info("distributed: rank %d of %d (%s)", rank, world, backend)
    return DistContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, initialized_here=True
    )


__all__ = [
    "DEFAULT_TIMEOUT",
    "DistContext",
    "init_distributed",
    "launch_local_rank",
    "launch_rank",
    "launch_world_size",
]
