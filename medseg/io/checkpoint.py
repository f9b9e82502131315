"""Checkpoints: atomic writes, safe loading (``weights_only=True``), RNG states as plain values.

A checkpoint is a ``torch.save``-d dict with ``format == "medseg-checkpoint-v1"`` and the keys listed in
:data:`REQUIRED_KEYS` (see CONTRACTS.md). It holds only tensors and Python builtins, so it loads with
``torch.load(weights_only=True)``; nothing in it can execute code.

Writes go to a temporary file in the same folder, are flushed to disk (``fsync``) and renamed over the
target, so a process killed at any moment leaves either the previous or the new complete checkpoint.
"""

from __future__ import annotations

import enum
import logging
import os
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.errors import CheckpointError
from medseg.faults import maybe_fail

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "medseg-checkpoint-v1"
REQUIRED_KEYS = ("format", "model", "epoch", "iteration", "train_config", "plan", "configuration", "arch")
_TMP_PREFIX = ".tmp_ckpt_"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename, fsync of the folder).

    Args:
        state: the checkpoint dict; ``format`` is set to :data:`CHECKPOINT_FORMAT` when missing.
        path: target file (``checkpoint_latest.pt`` ...); its folder is created.

    Raises:
        CheckpointError: the file system refused the write (disk full, permission denied); ``path`` is
            left as it was and no temporary file remains.
    """
    path = Path(path)
    state = dict(_plain(state))  # option enums (medseg.options) as their strings: a weights-only load refuses them
    state.setdefault("format", CHECKPOINT_FORMAT)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".pt", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            maybe_fail("checkpoint_write", path.name)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        kept = "; the previous checkpoint is kept" if path.is_file() else ""
        raise CheckpointError(f"{path}: cannot write the checkpoint ({exc.strerror or exc}){kept}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import (changing the umask briefly is not thread-safe)


def _plain(obj: Any) -> Any:
    """``obj`` with every :class:`~enum.Enum` member inside dicts, lists and tuples replaced by its value.

    Containers without one are returned as they are (a model's ``state_dict`` keeps its ``_metadata``).
    """
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        new = {k: _plain(v) for k, v in obj.items()}
        return obj if all(new[k] is v for k, v in obj.items()) else new
    if type(obj) in (list, tuple):
        items = [_plain(v) for v in obj]
        return obj if all(a is b for a, b in zip(items, obj)) else type(obj)(items)
    return obj


def _umask() -> int:
    return _UMASK


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporary checkpoint files a killed process left in ``folder``; return how many."""
    folder = Path(folder)
    n = 0
    if folder.is_dir():
        for p in folder.glob(f"{_TMP_PREFIX}*"):
            p.unlink(missing_ok=True)
            n += 1
    if n:
        logger.info("removed %d unfinished checkpoint file(s) left in %s by an interrupted run", n, folder)
    return n


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a medseg checkpoint safely.

    Args:
        path: the ``.pt`` file.
        map_location: device for the tensors.

    Returns:
        The checkpoint dict (see the module docstring).

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, contains objects other than tensors
            and builtins, or is not a medseg checkpoint (foreign format or missing keys).
    """
    return check_checkpoint(read_torch_file(path, map_location), path)


def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load any ``torch.save``-d file with ``weights_only=True`` (tensors and Python builtins only).

    Args:
        path: the file.
        map_location: device for the tensors.

    Returns:
        What the file holds (a medseg checkpoint, a foreign state dict, ...).

    Raises:
        CheckpointError: the file is missing, empty, truncated or corrupt, or contains objects other than
            tensors and builtins (it is then not loaded).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"{path}: checkpoint file is empty (truncated); delete it or resume from another checkpoint"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint, cannot be read ({_detail(exc)})") from None
    except Exception as exc:  # the weights-only unpickler raises pickle.UnpicklingError for foreign objects
        raise CheckpointError(
            f"{path}: not a medseg checkpoint or contains objects that cannot be loaded safely ({_detail(exc)}); "
            "it was not loaded"
        ) from None


def check_checkpoint(ckpt: Any, path: str | Path) -> dict[str, Any]:
    """``ckpt`` (read from ``path``) as a medseg checkpoint: the :data:`CHECKPOINT_FORMAT` and :data:`REQUIRED_KEYS`.

    Raises:
        CheckpointError: another format, or a key missing.
    """
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a medseg checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: incomplete medseg checkpoint, missing key(s) {missing}")
    return ckpt


def _detail(exc: BaseException) -> str:
    """The telling sentence of a torch.load error: the refused global, else the first sentence (not torch's
    advice to retry with ``weights_only=False``, which would run whatever code the file carries)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    line = next((ln for ln in lines if "GLOBAL" in ln), lines[0])
    return line.split(". ")[0].rstrip(".")[:200]


# ---------------------------------------------------------------------- RNG states as builtins/tensors
def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (legacy global) and torch RNG states as tensors and builtins."""
    py = random.getstate()
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # legacy=True, the default: the tuple form, never the dict
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(v) for v in py[1]), py[2]))
    ns = state["numpy"]
    np.random.set_state((str(ns[0]), np.asarray(ns[1], dtype=np.uint32), int(ns[2]), int(ns[3]), float(ns[4])))
    torch.set_rng_state(
        state["torch"].cpu() if isinstance(state["torch"], torch.Tensor) else torch.tensor(state["torch"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
