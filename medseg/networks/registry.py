"""Registry of network architectures, looked up by the name a plan records in ``NetworkPlan.arch``.

Built-in architectures register themselves with :func:`register_network` when :mod:`medseg.networks`
is imported. Third-party packages register theirs without touching medseg by declaring an entry point
in the group ``medseg.networks``::

    # pyproject.toml of the third-party package
    [project.entry-points."medseg.networks"]
    mynet = "mypackage.networks:build_mynet"

The entry point is loaded lazily, the first time :func:`build_network` is asked for a name that is not
registered yet. It may point at a builder (registered under the entry point's name) or at a module
whose import registers its networks through :func:`register_network`.

A builder is any callable ``builder(net: NetworkPlan, in_channels: int, num_classes: int) -> nn.Module``
(a module class with that ``__init__`` signature qualifies). The module's ``forward`` takes
``x`` of shape ``(B, in_channels, *net.patch_size)`` and returns logits ``(B, num_classes, *spatial)``; in
training mode with ``net.deep_supervision`` it returns a list of logits, full resolution first.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from collections.abc import Callable
from typing import TypeVar

from torch import nn

from medseg.errors import ConfigError, raise_for_problems
from medseg.planning.plan import NetworkPlan

logger = logging.getLogger(__name__)

#: Entry-point group third-party packages use to provide architectures.
ENTRY_POINT_GROUP = "medseg.networks"

NetworkBuilder = Callable[[NetworkPlan, int, int], nn.Module]
B = TypeVar("B", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, NetworkBuilder] = {}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]*$")


def register_network(name: str) -> Callable[[B], B]:
    """Class/function decorator registering a network builder under ``name``.

    Args:
        name: lower-case registry name (letters, digits, ``_``, ``-``), as written in plans.

    Returns:
        A decorator returning the builder unchanged.

    Raises:
        ValueError: ``name`` is malformed, or already taken by a different builder.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"network name must be lower-case letters, digits, '_' or '-', got {name!r}")

    def decorator(builder: B) -> B:
        existing = _REGISTRY.get(name)
        if existing is not None and _qualname(existing) != _qualname(builder):
            raise ValueError(f"network {name!r} is already registered by {_qualname(existing)}")
        _REGISTRY[name] = builder
        return builder

    return decorator


def available_networks() -> list[str]:
    """Sorted names of every architecture that can be built: registered ones and declared entry points."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def build_network(net: NetworkPlan, in_channels: int, num_classes: int) -> nn.Module:
    """Build the architecture ``net.arch`` for the topology, patch and options of ``net``.

    The module is returned in training mode, on the CPU, in float32, with the default memory format.

    Args:
        net: the network plan (architecture name, per-stage kernel sizes and strides, features, norm,
            deep supervision, architecture options).
        in_channels: number of input image channels ``C``.
        num_classes: number of output classes ``K`` including background.

    Returns:
        An ``nn.Module`` mapping ``(B, C, *spatial)`` to logits ``(B, K, *spatial)`` (a list of logits,
        full resolution first, in training mode with deep supervision). ``spatial`` must be divisible
        by ``net.total_stride()`` (see the module's ``size_divisor``).

    Raises:
        ConfigError: unknown architecture (the message lists the valid names), an inconsistent network
            plan, bad channel/class counts, or an architecture option with an invalid value.
    """
    if in_channels < 1 or num_classes < 1:
        raise ConfigError(f"need in_channels >= 1 and num_classes >= 1, got {in_channels} and {num_classes}")
    raise_for_problems(net.check(f"network {net.arch!r}"), ConfigError, "inconsistent network plan")
    builder = _lookup(net.arch)
    try:
        model = builder(net, in_channels, num_classes)
    except ValueError as exc:
        raise ConfigError(f"cannot build network {net.arch!r}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"the builder of network {net.arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _lookup(name: str) -> NetworkBuilder:
    if name in _REGISTRY:
        return _REGISTRY[name]
    eps = _entry_points()
    if name in eps:
        ep = eps[name]
        try:
            loaded = ep.load()
        except Exception as exc:  # a broken third-party package must not crash with a bare traceback
            raise ConfigError(
                f"network {name!r}: loading entry point {ep.value!r} (group {ENTRY_POINT_GROUP!r}) failed: {exc}"
            ) from exc
        if name not in _REGISTRY and callable(loaded):
            _REGISTRY[name] = loaded
        if name in _REGISTRY:
            logger.debug("network %r loaded from entry point %s", name, ep.value)
            return _REGISTRY[name]
        raise ConfigError(
            f"network {name!r}: entry point {ep.value!r} neither is a builder nor registers {name!r} on import"
        )
    raise ConfigError(f"unknown network architecture {name!r}; available: {', '.join(available_networks())}")


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
