"""Test-only fault injection: kill the process, or fail a write, at a named point of the pipeline.

The fault-injection suite (``tests/faults/``, ``scripts/bench_faults.py``) uses it to hit moments that an
outside ``kill -9`` cannot hit reliably, such as the middle of a checkpoint write. Nothing happens unless
a fault is armed; :mod:`medseg.cli.main` arms the faults named in the environment variable
:data:`ENV_VAR` (the command line is the only place medseg reads the environment)::

    MEDSEG_FAULT_INJECT="checkpoint_write:checkpoint_latest.pt@2" medseg train WORK --fold 0 ...

A spec is ``POINT[:NAME][@N][=ACTION]``, several separated by commas. ``POINT`` alone counts every hit of
that point, ``POINT:NAME`` only the hits for that file or case. The fault fires on the ``N``-th counted
hit (default 1). Actions:

* ``kill`` (default): ``SIGKILL`` to this process, like ``kill -9`` or the out-of-memory killer;
* ``enospc``: raise ``OSError(ENOSPC)`` on the ``N``-th and every later hit, like a full disk;
* ``stall``: print ``fault injected: POINT:NAME stalls`` to stderr and block forever, like a hung process
  (for an outside ``kill -9`` at a known moment, whatever the machine's speed);
* ``segv``: ``SIGSEGV`` to this process (default handler, no core file), like a native crash in torch;
* ``oom``: raise :class:`InjectedOutOfMemory` on the ``N``-th and every later hit, like a GPU running out of
  memory (the sliding window treats it as ``torch.OutOfMemoryError``).

Points (``NAME`` in brackets):

* ``checkpoint_write`` [file name]: :func:`medseg.io.checkpoint.save_checkpoint`, after the bytes went to
  the temporary file (not yet flushed, so it is partly written), before the rename;
* ``preprocess_write`` [case id]: :func:`medseg.preprocessing.storage.write_case`, after the case's
  ``.npz`` and before its ``.json``;
* ``segmentation_write`` [file name]: :func:`medseg.inference.export.write_segmentation`, after the
  temporary file was written, before the rename;
* ``predict_written`` [case id]: :func:`medseg.inference.folder.predict_folder`, after a case's
  segmentation was written (the next case may be in flight);
* ``final_validation`` [case id]: :func:`medseg.training.validation.validate_run`, after a held-out case
  was exported, before ``metrics.json``;
* ``train_step`` [iteration]: :meth:`medseg.training.trainer.Trainer.train_epoch`, after the optimizer step
  that completed that iteration (counted from 1 over the whole run); the trainer installs this point as a
  step hook only when it is armed (:func:`is_armed`), so its loop checks no fault otherwise;
* ``step_probe`` [precision: ``fp32``, ``bf16``, ``fp16``]: before every training step timed or probed by
  :mod:`medseg.planning.step_timing` (the budget fit's measurements, a run's check of its reduced precision).
  Those steps run in child processes, which arm the faults armed here (:func:`armed_spec`) and count their
  own hits: ``step_probe:bf16=segv`` kills every child that steps at bf16;
* ``window_batch`` [out-of-memory fallback step: ``as_asked``, ``batch_1``, ``cpu_accumulation``, ``cpu``]:
  before every network batch of the sliding window (:mod:`medseg.inference.window_pass`), only when armed:
  ``window_batch:as_asked=oom`` makes the first way run out of memory, so the next one finishes the case.
"""

from __future__ import annotations

import errno
import faulthandler
import os
import resource
import signal
import sys
import threading
from dataclasses import dataclass

from medseg.errors import ConfigError

ENV_VAR = "MEDSEG_FAULT_INJECT"
POINTS = (
    "checkpoint_write",
    "preprocess_write",
    "segmentation_write",
    "predict_written",
    "final_validation",
    "train_step",
    "step_probe",
    "window_batch",
)
ACTIONS = ("kill", "enospc", "stall", "segv", "oom")


class InjectedOutOfMemory(RuntimeError):
    """The ``oom`` action's error: a stand-in for ``torch.OutOfMemoryError`` on a machine without a GPU."""


@dataclass
class _Fault:
    point: str  # "POINT" or "POINT:NAME"
    nth: int
    action: str
    hits: int = 0


_armed: list[_Fault] = []
_lock = threading.Lock()


def arm(spec: str | None) -> None:
    """Arm the faults of ``spec`` (see the module docstring), replacing any armed before; None/"" disarms.

    Raises:
        ConfigError: a malformed spec, an unknown point or action.
    """
    faults = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        rest, _, action = part.partition("=")
        point, _, nth = rest.partition("@")
        if (
            point.partition(":")[0] not in POINTS
            or (action or "kill") not in ACTIONS
            or not (nth or "1").isdigit()
            or int(nth or "1") < 1
        ):
            raise ConfigError(
                f"{ENV_VAR}: cannot use {part!r}; expected POINT[:NAME][@N][=ACTION] with a point "
                f"of {list(POINTS)}, N >= 1 and an action of {list(ACTIONS)}"
            )
        faults.append(_Fault(point, int(nth or "1"), action or "kill"))
    with _lock:
        _armed[:] = faults


def armed_spec() -> str:
    """The spec of the faults armed now (``""`` when none), for :func:`arm` in a child process."""
    with _lock:
        return ",".join(f"{f.point}@{f.nth}={f.action}" for f in _armed)


def is_armed(point: str) -> bool:
    """Whether a fault of ``point`` (any ``NAME``) is armed: code off the hot paths installs its hook only then."""
    with _lock:
        return any(f.point.partition(":")[0] == point for f in _armed)


def maybe_fail(point: str, name: str = "") -> None:
    """Fire an armed fault of ``point`` (for file or case ``name``) when its hit count is reached.

    Raises:
        OSError: ``ENOSPC`` when an ``enospc`` fault fires.
    """
    if not _armed:
        return
    with _lock:
        fired = None
        for fault in _armed:
            if fault.point in (point, f"{point}:{name}"):
                fault.hits += 1
                if fault.hits >= fault.nth:
                    fired = fired or fault.action
    if fired == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fired == "segv":
        faulthandler.disable()
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGSEGV)
    elif fired == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    elif fired == "oom":
        raise InjectedOutOfMemory(f"CUDA out of memory (fault injected at {point}:{name})")
    elif fired == "stall":
        print(f"fault injected: {point}:{name} stalls", file=sys.stderr, flush=True)
        threading.Event().wait()
