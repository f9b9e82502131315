"""Segmentation networks built from a topology (NetworkSpec): registry plus ``unet``, ``deeplab``, ``psp``, ``fcn``
and MONAI's ``segresnet``, ``swinunetr`` and ``dynunet`` (:mod:`medseg.networks.monai_nets`).

Every architecture works in 2D and 3D from one code path (the patch size's length picks the layers),
normalises with instance norm (affine) by default (``batch``/``group`` selectable in the spec),
activates with LeakyReLU(0.01) (MONAI's networks: their own activations), returns logits, and in training mode
with deep supervision returns a list of logits, full resolution first. Public API::

    build_network(spec: NetworkSpec, in_channels, num_classes, *, patch_size=None) -> nn.Module
    register_network(name)        # decorator; third parties may also use the "medseg.networks" entry points
    available_networks() -> list[str]
    accepted_spec(spec) -> NetworkSpec            # the nearest topology the architecture accepts
    topology_problems(spec, patch_size, where)    # why an architecture refuses a topology / patch

Networks take a :class:`~medseg.networks.spec.NetworkSpec` (topology only); patch, batch, precision and
the memory model are decisions of the planning layer (its ``NetworkPlan`` holds a spec), which sits above
this package and is never imported from it.
"""

from __future__ import annotations

from medseg.networks.registry import (
    ENTRY_POINT_GROUP,
    accepted_spec,
    available_networks,
    build_network,
    register_network,
    topology_problems,
)
from medseg.networks.spec import NetworkSpec

# importing the architectures registers them
from medseg.networks import deeplab, fcn, monai_nets, psp, unet  # noqa: E402,F401  isort:skip

__all__ = [
    "ENTRY_POINT_GROUP",
    "NetworkSpec",
    "accepted_spec",
    "available_networks",
    "build_network",
    "register_network",
    "topology_problems",
]
