"""Segmentation networks built from a plan: registry plus ``unet``, ``deeplab``, ``psp`` and ``fcn``.

Every architecture works in 2D and 3D from one code path (the patch size's length picks the layers),
normalises with instance norm (affine) by default (``batch``/``group`` selectable in the plan),
activates with LeakyReLU(0.01), returns logits, and in training mode with deep supervision returns a
list of logits, full resolution first. Public API::

    build_network(net: NetworkPlan, in_channels, num_classes) -> nn.Module
    register_network(name)        # decorator; third parties may also use the "medseg.networks" entry points
    available_networks() -> list[str]

The memory model the planner uses lives in :mod:`medseg.networks.memory`.
"""

from __future__ import annotations

from medseg.networks.registry import ENTRY_POINT_GROUP, available_networks, build_network, register_network

# importing the architectures registers them
from medseg.networks import deeplab, fcn, psp, unet  # noqa: E402,F401  isort:skip

__all__ = ["ENTRY_POINT_GROUP", "available_networks", "build_network", "register_network"]
