"""Registry of network architectures, looked up by the name a plan records in ``NetworkSpec.arch``.

Built-in architectures register themselves with :func:`register_network` when :mod:`medseg.networks`
is imported. Third-party packages register theirs without touching medseg by declaring an entry point
in the group ``medseg.networks``::

    # pyproject.toml of the third-party package
    [project.entry-points."medseg.networks"]
    mynet = "mypackage.networks:build_mynet"

The entry point is loaded lazily, the first time :func:`build_network` is asked for a name that is not
registered yet. It may point at a builder (registered under the entry point's name) or at a module
whose import registers its networks through :func:`register_network`.

A builder is any callable ``builder(spec: NetworkSpec, in_channels: int, num_classes: int) -> nn.Module``
(a module class with that ``__init__`` signature qualifies). A builder that also declares a
``patch_size`` parameter receives the training patch size (``deeplab`` and ``psp`` size their context
heads for it). The module's ``forward`` takes ``x`` of shape ``(B, in_channels, *spatial)`` and returns
logits ``(B, num_classes, *spatial)``; in training mode with ``spec.deep_supervision`` it returns a list
of logits, full resolution first.

A builder may also say which topologies it accepts (architectures with a fixed or constrained layout, e.g.
MONAI's): a callable attribute ``accepted_spec(spec) -> NetworkSpec`` returning the accepted spec nearest to
``spec`` (the planner records that one, :func:`accepted_spec`), and ``topology_problems(spec, patch_size, where) -> list[str]``
saying why a spec (and training patch, or None) is refused (a plan's validation lists them, :func:`topology_problems`).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

from torch import nn

from medseg.errors import ConfigError, raise_for_problems
from medseg.networks.spec import NetworkSpec

logger = logging.getLogger(__name__)

#: Entry-point group third-party packages use to provide architectures.
ENTRY_POINT_GROUP = "medseg.networks"

NetworkBuilder = Callable[..., nn.Module]
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


def build_network(
    spec: NetworkSpec, in_channels: int, num_classes: int, *, patch_size: Sequence[int] | None = None
) -> nn.Module:
    """Build the architecture ``spec.arch`` for the topology and options of ``spec``.

    The module is returned in training mode, on the CPU, in float32, with the default memory format.

    Args:
        spec: the network topology (architecture name, per-stage kernel sizes and strides, features, norm,
            deep supervision, architecture options).
        in_channels: number of input image channels ``C``.
        num_classes: number of output classes ``K`` including background.
        patch_size: the training patch ``(Z, Y, X)`` or ``(Y, X)`` in voxels; checked against the topology
            and handed to builders that take it (``deeplab`` and ``psp`` need it to size their context head).

    Returns:
        An ``nn.Module`` mapping ``(B, C, *spatial)`` to logits ``(B, K, *spatial)`` (a list of logits,
        full resolution first, in training mode with deep supervision). ``spatial`` must be divisible
        by ``spec.total_stride()`` (see the module's ``size_divisor``).

    Raises:
        ConfigError: unknown architecture (the message lists the valid names), an inconsistent topology,
            a patch size the topology cannot take, bad channel/class counts, or an architecture option with
            an invalid value.
    """
    if in_channels < 1 or num_classes < 1:
        raise ConfigError(f"need in_channels >= 1 and num_classes >= 1, got {in_channels} and {num_classes}")
    where = f"network {spec.arch!r}"
    problems = spec.check(where)
    if patch_size is not None and not problems:
        problems = spec.patch_problems(patch_size, where) or topology_problems(spec, patch_size, where)
    raise_for_problems(problems, ConfigError, "inconsistent network plan")
    builder = _lookup(spec.arch)
    kwargs = {"patch_size": tuple(patch_size)} if patch_size is not None and _takes_patch_size(builder) else {}
    try:
        model = builder(spec, in_channels, num_classes, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"cannot build network {spec.arch!r}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"the builder of network {spec.arch!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def accepted_spec(spec: NetworkSpec) -> NetworkSpec:
    """The spec nearest to ``spec`` that architecture ``spec.arch`` accepts (``spec`` when it takes any topology).

    Raises:
        ConfigError: unknown architecture.
    """
    adapt = getattr(_lookup(spec.arch), "accepted_spec", None)
    return adapt(spec) if callable(adapt) else spec


def topology_problems(spec: NetworkSpec, patch_size: Sequence[int] | None, where: str) -> list[str]:
    """Why the registered architecture ``spec.arch`` cannot be built for ``spec`` and trained on ``patch_size``
    (empty when it can, or when the architecture is not registered yet: building it reports that).

    Args:
        spec: a topology that passes ``spec.check``.
        patch_size: the training patch ``(Z, Y, X)`` or ``(Y, X)``, divisible by ``spec.total_stride()``; None: any.
        where: prefix of every message.
    """
    check = getattr(_REGISTRY.get(spec.arch), "topology_problems", None)
    return list(check(spec, patch_size, where)) if callable(check) else []


def _takes_patch_size(builder: NetworkBuilder) -> bool:
    try:
        return "patch_size" in inspect.signature(builder).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


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
