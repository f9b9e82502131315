"""Data-parallel training with ``torch.distributed`` when launched by ``torchrun``.

``torchrun --nproc-per-node N -m medseg train ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; each
process then trains a replica (gloo on CPU, NCCL on CUDA; :func:`medseg.distributed.init_distributed`),
gradients are averaged, and the global batch of the plan is split across the ranks
(:meth:`medseg.distributed.DistContext.batch_slice`). Only rank 0 writes files.
"""

from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


__all__ = ["unwrap"]
