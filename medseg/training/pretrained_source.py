"""Where fine-tuning's weights come from (``medseg train --pretrained MODEL``): reading ``MODEL``.

``MODEL`` is one of:

* a model bundle from ``medseg export``: one member is used, the one of the run's configuration and
  architecture, fold 0 when it has one, else the first; failing that the first of the run's architecture;
* a medseg run checkpoint (``checkpoint_{final,best,latest}.pt``);
* for an architecture that wraps a MONAI network (``segresnet``, ``swinunetr``, ``dynunet``:
  :class:`~medseg.networks.monai_nets.MonaiNetwork`), a plain PyTorch state dict of that MONAI module, as MONAI
  bundles (``models/model.pt``) and Auto3DSeg (``model.pt``) save it: a ``.pt``/``.pth`` file holding the
  module's ``state_dict()``, or a dict whose ``state_dict`` (else ``model``) entry holds it. A ``module.``
  (DistributedDataParallel) or ``_orig_mod.`` (``torch.compile``) prefix on every name is dropped, and the
  names are given the wrapper's prefix (``monai.``); names that already carry it (the state dict of medseg's
  wrapper) are kept.

Every file is read with ``torch.load(weights_only=True)``: nothing in it can run code. Which tensors then load
is decided by :mod:`medseg.training.pretrained` (by name and shape, the same rule for every source).
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medseg.errors import CheckpointError, MedsegError
from medseg.inference.bundle import load_bundle, read_manifest
from medseg.io.checkpoint import CHECKPOINT_FORMAT, check_checkpoint, read_torch_file
from medseg.io.workdir import BundleLayout, RunDir, fold_name, parse_fold
from medseg.planning.plan import Plan

logger = logging.getLogger(__name__)

_HINT = f"give a {RunDir.checkpoint_file('final')} of a medseg run or a model.zip from `medseg export`"
#: Entries of a saved dict that hold a state dict (MONAI bundles and Auto3DSeg: ``state_dict``; others ``model``).
STATE_DICT_ENTRIES = ("state_dict", "model")
#: Prefixes that wrappers put before every tensor name: DistributedDataParallel's and ``torch.compile``'s.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class PretrainedSource:
    """Weights read from a bundle member, a run checkpoint or a plain state dict.

    Attributes:
        path: the file given.
        member: what in it was used, for people (``3d_fullres/unet/fold_0 of the bundle``, ``checkpoint of
            3d_fullres/unet fold 0, iteration 250``, ``plain state dict of 214 tensors: its 'state_dict' entry``).
        state: the network's state dict (name -> tensor, on the CPU), named as the run's network names them.
        plan: the plan the pretrained network was trained with; None for a plain state dict.
        configuration / arch: the pretrained network's configuration and architecture; None for a plain
            state dict.
    """

    path: Path
    member: str
    state: dict[str, torch.Tensor]
    plan: Plan | None
    configuration: str | None
    arch: str | None


def read_pretrained(
    path: str | Path, configuration: str, arch: str, module_prefix: str | None = None
) -> PretrainedSource:
    """Read the weights of a model bundle member, a run checkpoint or a plain state dict (module docstring).

    Args:
        path: ``model.zip`` from ``medseg export``, a medseg ``checkpoint_*.pt``, or a plain state dict.
        configuration / arch: what the run trains (selects the bundle member).
        module_prefix: when the run's network wraps another library's module, the prefix of that module's
            tensor names in the network (:attr:`~medseg.networks.monai_nets.MonaiNetwork.MODULE_PREFIX`); a
            plain state dict is read only then. None: medseg sources only.

    Returns:
        The :class:`PretrainedSource`.

    Raises:
        MedsegError: the file is missing or a folder, or neither a medseg checkpoint nor a model bundle
            (:class:`~medseg.errors.BundleError` for a broken bundle) nor, with ``module_prefix``, a state dict;
            or a bundle without a network of ``arch``.
    """
    path = Path(path)
    if not path.exists():
        raise MedsegError(f"{path}: pretrained weights not found; {_HINT}")
    if path.is_dir():
        raise MedsegError(f"{path}: is a folder; {_HINT} (e.g. {RunDir(path).checkpoint('final')})")
    if path.suffix == ".zip" or _has_manifest(path):
        return _from_bundle(path, configuration, arch)
    if not zipfile.is_zipfile(path):  # torch.save and medseg export both write zip archives
        raise MedsegError(
            f"{path}: not a medseg checkpoint or model bundle, nor a state dict saved by torch.save (not a zip "
            f"archive, or truncated); {_HINT}"
        )
    try:
        saved = read_torch_file(path)
    except CheckpointError as exc:
        raise MedsegError(f"{exc}; {_HINT}") from None
    if isinstance(saved, dict) and saved.get("format") == CHECKPOINT_FORMAT:
        return _from_checkpoint(path, saved)
    return _from_state_dict(path, saved, arch, module_prefix)


def _from_checkpoint(path: Path, saved: dict[str, Any]) -> PretrainedSource:
    try:
        ckpt = check_checkpoint(saved, path)
    except CheckpointError as exc:
        raise MedsegError(f"{exc}; {_HINT}") from None
    try:
        plan = Plan.from_dict(ckpt["plan"])
    except MedsegError as exc:
        raise MedsegError(f"{path}: the checkpoint's plan is unreadable ({exc})") from None
    fold = (ckpt.get("train_config") or {}).get("fold", "?")
    member = f"checkpoint of {ckpt['configuration']}/{ckpt['arch']} fold {fold}, iteration {ckpt['iteration']}"
    return PretrainedSource(
        path=path,
        member=member,
        state=dict(ckpt["model"]),
        plan=plan,
        configuration=str(ckpt["configuration"]),
        arch=str(ckpt["arch"]),
    )


def _from_state_dict(path: Path, saved: Any, arch: str, module_prefix: str | None) -> PretrainedSource:
    found = find_state_dict(saved)
    if found is None:
        what = f"a dict with keys {sorted(map(str, saved))[:8]}" if isinstance(saved, Mapping) else type(saved).__name__
        raise MedsegError(
            f"{path}: not a medseg checkpoint, and holds no state dict (a dict of tensors, or a dict with a "
            f"{' or '.join(map(repr, STATE_DICT_ENTRIES))} entry holding one) but {what}; {_HINT}"
        )
    state, where = found
    if module_prefix is None:
        raise MedsegError(
            f"{path}: not a medseg checkpoint but a plain state dict of {len(state)} tensors ({where}); plain state "
            f"dicts are read for architectures that wrap a MONAI network, and this run trains {arch}; {_HINT}"
        )
    state = {(n if n.startswith(module_prefix) else module_prefix + n): t for n, t in state.items()}
    member = f"plain state dict of {len(state)} tensors: {where}"
    logger.info("pretrained: %s: %s, names given the prefix %r", path, member, module_prefix)
    return PretrainedSource(path=path, member=member, state=state, plan=None, configuration=None, arch=None)


def find_state_dict(saved: Any) -> tuple[dict[str, torch.Tensor], str] | None:
    """The state dict in what a ``torch.load`` returned, and where it was found (for people).

    Args:
        saved: a dict of tensors, or a dict whose :data:`STATE_DICT_ENTRIES` entry is one (the first that is).

    Returns:
        ``(state, where)``: the tensors (entries that are not tensors dropped), with a
        :data:`WRAPPER_PREFIXES` prefixes shared by every name removed; None when ``saved`` holds no tensor.
    """
    if not isinstance(saved, Mapping):
        return None
    candidates = [(saved.get(key), f"its {key!r} entry") for key in STATE_DICT_ENTRIES]
    for inner, where in [*candidates, (saved, "the whole file")]:
        state = (
            {str(n): t for n, t in inner.items() if isinstance(t, torch.Tensor)} if isinstance(inner, Mapping) else {}
        )
        if state:
            while (
                wrap := next((w for w in WRAPPER_PREFIXES if all(n.startswith(w) for n in state)), None)
            ) is not None:
                state = {n[len(wrap) :]: t for n, t in state.items()}  # wrappers nest (a compiled DDP module)
            return state, where
    return None


def _has_manifest(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return BundleLayout.MANIFEST in zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False


def _from_bundle(path: Path, configuration: str, arch: str) -> PretrainedSource:
    members = read_manifest(path)["members"]
    same = [m for m in members if m["configuration"] == configuration and m["arch"] == arch]
    candidates = same or [m for m in members if m["arch"] == arch]
    if not candidates:
        have = [f"{m['configuration']}/{m['arch']}/{m['fold']}" for m in members]
        raise MedsegError(
            f"{path}: the bundle holds no {arch} network to start {configuration}/{arch} from; it holds {have}"
        )
    entry = next((m for m in candidates if m["fold"] == fold_name(0)), candidates[0])
    fold = parse_fold(entry["fold"])
    if fold is None:
        raise MedsegError(f"{path}: the bundle's manifest names fold {entry['fold']!r}, not fold_<k> or fold_all")
    loaded, _ = load_bundle(
        path, configs=[entry["configuration"]], archs=[entry["arch"]], folds=[fold], postprocessing=False
    )
    net = loaded[0]
    name = f"{entry['configuration']}/{entry['arch']}/{entry['fold']}"
    others = len(members) - 1
    member = f"{name} of the bundle" + (f" (of its {len(members)} networks)" if others else "")
    if not same:
        logger.warning("pretrained: %s holds no %s/%s network; using %s", path, configuration, arch, name)
    return PretrainedSource(
        path=path,
        member=member,
        state=net.model.state_dict(),
        plan=net.plan,
        configuration=entry["configuration"],
        arch=entry["arch"],
    )


__all__ = ["STATE_DICT_ENTRIES", "WRAPPER_PREFIXES", "PretrainedSource", "find_state_dict", "read_pretrained"]
