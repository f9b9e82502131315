"""Fine-tuning from pretrained weights: ``medseg train WORK --pretrained model.zip|checkpoint.pt|state_dict.pt``.

The source is a model bundle from ``medseg export``, a medseg run checkpoint, or, for an architecture that
wraps a MONAI network, a plain state dict of the MONAI module (MONAI bundles, Auto3DSeg); reading it is
:mod:`medseg.training.pretrained_source` (always ``torch.load(weights_only=True)``).

Every tensor of the new network whose name and shape match a pretrained tensor is loaded
(:func:`match_weights`); the others keep their fresh initialisation. That re-initialises exactly what
cannot carry over: the first convolution when the number of input channels differs, the output heads
(deep-supervision heads included) when the number of classes differs. A pretrained network with no
matching tensor at all (another architecture or width) is refused. What was loaded and skipped is
logged and recorded in the run's ``run_record.json`` (``RunRecord.pretrained_report``).

A time-budgeted run with pretrained weights trains the plan's network as it is: the refit to the budget
(:mod:`medseg.training.budget_refit`) could change its width, and then the weights would not fit. A
resumed run continues from its checkpoint and never loads the pretrained weights again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.errors import MedsegError
from medseg.networks.monai_nets import MonaiNetwork
from medseg.planning.plan import Plan
from medseg.planning.stage import Stage
from medseg.training.pretrained_source import PretrainedSource, read_pretrained

logger = logging.getLogger(__name__)

#: Below this fraction of the network's weights loaded, a warning says the network is mostly freshly initialised.
LOW_MATCH_FRACTION = 0.5


@dataclass(frozen=True)
class WeightMatch:
    """Which tensors of a network a pretrained state dict can fill (:func:`match_weights`).

    Attributes:
        names: the network's tensor names, in state-dict order.
        loaded: names of the network's tensors with a pretrained tensor of the same name and shape.
        mismatched: network tensor name -> (pretrained shape, network shape) where both exist.
        unused: names of pretrained tensors the network lacks.
        loaded_elements / total_elements: numbers of values (weights) loaded and in the network.
        loaded_kernels: how many of the loaded tensors have two or more dimensions (convolution and linear
            weights; biases and norm parameters of a class count or a width can match by chance).
    """

    names: tuple[str, ...]
    loaded: tuple[str, ...]
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    unused: tuple[str, ...] = ()
    loaded_elements: int = 0
    total_elements: int = 0
    loaded_kernels: int = 0

    @property
    def total(self) -> int:
        """Number of tensors in the network's state dict."""
        return len(self.names)

    @property
    def skipped(self) -> list[str]:
        """The network's tensors left at their fresh initialisation (mismatched or missing), in network order."""
        loaded = set(self.loaded)
        return [n for n in self.names if n not in loaded]

    @property
    def fraction(self) -> float:
        """Fraction of the network's values (weights) that are loaded."""
        return self.loaded_elements / max(self.total_elements, 1)


def match_weights(network: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor]) -> WeightMatch:
    """Match a network's state dict against a pretrained one by name and shape.

    Args:
        network: the new network's ``state_dict()`` (any device, meta included: only shapes are read).
        pretrained: the pretrained ``state_dict()``.

    Returns:
        The :class:`WeightMatch`; a tensor counts as loaded when the name exists in both with the same
        shape and both are floating point or both are not.
    """
    loaded, mismatched = [], {}
    loaded_elements = total_elements = loaded_kernels = 0
    for name, t in network.items():
        total_elements += t.numel()
        p = pretrained.get(name)
        if not isinstance(p, torch.Tensor):
            continue
        if tuple(p.shape) != tuple(t.shape) or p.is_floating_point() != t.is_floating_point():
            mismatched[name] = (tuple(p.shape), tuple(t.shape))
        else:
            loaded.append(name)
            loaded_elements += t.numel()
            loaded_kernels += t.dim() >= 2
    unused = tuple(n for n in pretrained if n not in network)
    return WeightMatch(
        names=tuple(network),
        loaded=tuple(loaded),
        mismatched=mismatched,
        unused=unused,
        loaded_elements=loaded_elements,
        total_elements=total_elements,
        loaded_kernels=loaded_kernels,
    )


def _shape(s: tuple[int, ...]) -> str:
    return "x".join(map(str, s)) or "scalar"


def _net_words(plan: Plan, configuration: str, arch: str) -> str:
    try:
        net = plan.configuration(configuration).network(arch)
    except MedsegError:
        return f"{configuration}/{arch}"
    spec = net.spec
    return (
        f"{configuration}/{arch}, {spec.base_features}-{spec.max_features} features, {spec.num_stages} stages, "
        f"{plan.num_channels} channel(s), {plan.num_classes} classes"
    )


def _source_words(source: PretrainedSource) -> str:
    """The pretrained network for people: its plan's network, or a plain state dict's first tensors."""
    if source.plan is not None and source.configuration is not None and source.arch is not None:
        return f"{source.member}: {_net_words(source.plan, source.configuration, source.arch)}"
    first = ", ".join(f"{n} {_shape(tuple(t.shape))}" for n, t in list(source.state.items())[:3])
    return f"{source.member}: {first}, ..."


def check_match(match: WeightMatch, source: PretrainedSource, stage: Stage, warn: bool = True) -> None:
    """Refuse a pretrained network of which no tensor fits; warn (``warn``) when less than half of the weights do.

    Raises:
        MedsegError: no tensor matches, or only biases / norm parameters (one-dimensional tensors, which
            can match by chance: the heads' biases whenever the classes agree); the message describes
            both networks.
    """
    here = _net_words(stage.plan, stage.config_name, stage.arch)
    if source.plan is None:  # a plain state dict: show the names on both sides
        here += f": {', '.join(match.names[:3])}, ..."
    if not match.loaded_kernels:
        what = f"{len(match.loaded)}" if match.loaded else "0"
        none = ", none of them a convolution or linear weight" if match.loaded else ""
        raise MedsegError(
            f"{source.path}: {what} of {match.total} tensors match{none}: the pretrained network is a different "
            f"architecture/width ({_source_words(source)}; this run: {here}); train without --pretrained, or give "
            f"WORK/plans.json the pretrained network's {stage.arch} fields (base_features, max_features, "
            "kernel_sizes, strides)"
        )
    fraction = match.fraction
    if warn and fraction < LOW_MATCH_FRACTION:
        logger.warning(
            "pretrained: only %.0f%% of the network's weights match; the rest is freshly initialised "
            "(pretrained %s; this run %s)",
            100 * fraction,
            _source_words(source),
            here,
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _meta_network(stage: Stage) -> nn.Module:
    """The run's network built on the meta device (shapes only, no memory, no RNG use)."""
    with torch.device("meta"):
        return stage.network.build(stage.in_channels, stage.num_classes)


def prepare_pretrained(path: str | Path, stage: Stage) -> PretrainedSource:
    """Read the pretrained weights and check that they fit the run's network before any data is loaded.

    Args:
        path: ``model.zip``, ``checkpoint_*.pt``, or (for a network wrapping a MONAI module) a plain state dict.
        stage: what the run trains (after :func:`~medseg.training.run_stage.run_plan`).

    Raises:
        MedsegError: see :func:`~medseg.training.pretrained_source.read_pretrained` and :func:`check_match`.
    """
    network = _meta_network(stage)
    prefix = network.MODULE_PREFIX if isinstance(network, MonaiNetwork) else None
    source = read_pretrained(path, stage.config_name, stage.arch, module_prefix=prefix)
    check_match(
        match_weights(network.state_dict(), source.state), source, stage, warn=False
    )  # load_pretrained warns, into the run's log
    if source.plan is not None:
        _note_differences(source.plan, stage.plan)
    return source


def _note_differences(old: Plan, new: Plan) -> None:
    """Log what the pretrained network saw differently (labels, channels): the weights still load by shape."""
    if old.label_names != new.label_names:
        logger.info(
            "pretrained: trained for labels %s, this dataset has %s", list(old.label_names), list(new.label_names)
        )
    if old.channel_names != new.channel_names:
        logger.info(
            "pretrained: trained on channels %s, this dataset has %s", list(old.channel_names), list(new.channel_names)
        )


def load_pretrained(model: nn.Module, source: PretrainedSource, stage: Stage) -> dict[str, Any]:
    """Copy the matching pretrained tensors into ``model`` and describe what was done.

    Args:
        model: the freshly initialised network of the run (unwrapped from DDP).
        source: from :func:`prepare_pretrained`.
        stage: what the run trains (for messages).

    Returns:
        The record stored as ``RunRecord.pretrained_report``: ``source`` (absolute path), ``sha256``,
        ``member``, ``loaded`` / ``tensors`` (counts), ``loaded_weights_fraction``, ``skipped`` (names of
        the network's tensors left at their fresh initialisation), ``mismatched_shapes`` (name ->
        ``["4x32x1x1x1", "3x32x1x1x1"]``: pretrained, network) and ``unused`` (pretrained tensors the network lacks).

    Raises:
        MedsegError: no tensor matches (:func:`check_match`).
    """
    match = match_weights(model.state_dict(), source.state)
    check_match(match, source, stage)
    result = model.load_state_dict({n: source.state[n] for n in match.loaded}, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    fraction = match.fraction
    logger.info(
        "pretrained: loaded %d of %d tensors (%.2f%% of the weights) from %s (%s)",
        len(match.loaded),
        match.total,
        100 * fraction,
        source.path,
        source.member,
    )
    if match.skipped:
        reasons = [
            f"{n} ({_shape(match.mismatched[n][0])} pretrained, {_shape(match.mismatched[n][1])} here)"
            if n in match.mismatched
            else f"{n} (not in the pretrained network)"
            for n in match.skipped
        ]
        logger.info(
            "pretrained: %d tensor(s) keep their fresh initialisation: %s", len(match.skipped), ", ".join(reasons)
        )
    if match.unused:
        logger.info(
            "pretrained: %d pretrained tensor(s) have no place in this network: %s",
            len(match.unused),
            ", ".join(match.unused),
        )
    return {
        "source": str(source.path.resolve()),
        "sha256": _sha256(source.path),
        "member": source.member,
        "loaded": len(match.loaded),
        "tensors": match.total,
        "loaded_weights_fraction": round(fraction, 6),
        "skipped": match.skipped,
        "mismatched_shapes": {n: [_shape(a), _shape(b)] for n, (a, b) in match.mismatched.items()},
        "unused": list(match.unused),
    }


__all__ = [
    "PretrainedSource",
    "WeightMatch",
    "check_match",
    "load_pretrained",
    "match_weights",
    "prepare_pretrained",
    "read_pretrained",
]
