"""Time training steps in a child process, so that a step that crashes natively takes only the child along.

**Native crashes** (:func:`measure_in_child`): a training step can kill its process outright, e.g. torch
2.13's oneDNN bf16 backward at 12x256x256 on a CPU with AMX (SIGSEGV, reported in issue 42), which no ``try`` catches. The
planner therefore times every batch of settings in a child process, a fresh interpreter (``sys.executable
-c``, like ``multiprocessing``'s spawn and never a ``fork``: torch's OpenMP and oneDNN thread pools are not
safe to use after a fork), with the parent's intra-op thread count. When the child dies, the setting it
was building or stepping (it names each one on its pipe first) gets the status ``crashed (SIGSEGV)``
(:class:`~medseg.planning.step_timing.StepTiming`) and the other settings are measured again in a new child; the budget fit records the
crash and never chooses that setting. A child costs one interpreter start and the imports of torch and
medseg per batch: 2.2 s on 2 idle cores, 2.6-2.9 s with the cores busy (AMD EPYC, torch 2.13; a child's
wall time less the time it spent in its own work, 5 repeats), against fits of 18-47 s; the fit counts it in
its time limit (:data:`CHILD_START_SECONDS` until it has measured its own). The child also returns the
steps' memory to the system when it exits.

The test-only fault point ``step_probe`` of :mod:`medseg.faults` (NAME: the precision) fires before each
step; the parent hands its armed faults to the child, so ``MEDSEG_FAULT_INJECT=step_probe:bf16=segv``
makes every bf16 step's process die of SIGSEGV.

The timing itself (settings, rounds, the fastest-round statistic) is :mod:`medseg.planning.step_timing`'s;
this module only runs it elsewhere and reads the answers back.
"""

from __future__ import annotations

import faulthandler
import logging
import math
import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from medseg import faults
from medseg.planning.step_timing import (
    CHEAP_ROUNDS_SECONDS,
    DEFAULT_MEASURE_STEPS,
    WARMUP_STEPS,
    StepSetting,
    StepTiming,
    _check_counts,
    _log_timings,
    _time_settings,
)

logger = logging.getLogger(__name__)

#: Seconds a measuring child process costs before its first step (interpreter, torch and medseg imports),
#: used until one has been measured: 2.2 s measured on 2 cores (AMD EPYC, torch 2.13), rounded up.
CHILD_START_SECONDS = 2.5


@dataclass(frozen=True)
class ChildMeasurement:
    """:func:`measure_in_child`'s answer: one :class:`StepTiming` per setting, and what the isolation cost.

    Attributes:
        timings: per setting, in the order given.
        children: processes started (one per batch, one more after each crash).
        overhead_s: seconds of the children that answered outside their measuring (start, imports), summed.
        crashes: statuses of the children that died.
        threads: intra-op threads of the children (this process's ``torch.get_num_threads()``); None when
            none answered.
    """

    timings: list[StepTiming]
    children: int
    overhead_s: float
    crashes: tuple[str, ...] = ()
    threads: int | None = None


def measure_in_child(
    settings: Sequence[StepSetting],
    steps: int = DEFAULT_MEASURE_STEPS,
    *,
    warmup: int = WARMUP_STEPS,
    seed: int = 0,
    progress: bool = True,
    cheap_seconds: float = CHEAP_ROUNDS_SECONDS,
    fault_spec: str | None = None,
) -> ChildMeasurement:
    """:func:`measure_step_times` in a child process that may crash without taking this one along.

    The child runs with this process's ``torch.get_num_threads()``. When it dies (a signal, a non-zero
    exit) the setting it was building or stepping gets the status ``crashed (<signal>)``, and the others
    are measured again in a new child; a child that dies outside any setting has its settings measured one
    per child. A Python exception in the child (other than out of memory) is raised here.

    Args:
        settings, steps, warmup, seed, progress, cheap_seconds: as for :func:`measure_step_times`.
        fault_spec: test-only faults to arm in the child (:mod:`medseg.faults`); None: those armed here.

    Returns:
        A :class:`ChildMeasurement`: per setting a :class:`StepTiming` (``seconds`` ``math.inf`` for out of
        memory or crashed), the children started and their start-up overhead.

    Raises:
        ValueError: ``steps < 1`` or ``warmup < 0``.
        ConfigError: a network that cannot be built (raised in the child, re-raised here).
    """
    _check_counts(steps, warmup)
    if fault_spec is None:
        fault_spec = faults.armed_spec()
    results: list[StepTiming | None] = [None] * len(settings)
    spent: dict[str, Any] = {"children": 0, "overhead": 0.0, "threads": None}
    crashes: list[str] = []

    def run(indices: list[int]) -> None:
        while indices:
            batch = [settings[i] for i in indices]
            timings, culprit, status, overhead, threads = _run_child(
                batch, steps, warmup, seed, progress, cheap_seconds, fault_spec
            )
            spent["children"] += 1
            spent["overhead"] += overhead
            spent["threads"] = threads or spent["threads"]
            if timings is not None:
                for i, t in zip(indices, timings):
                    results[i] = t
                return
            crashes.append(status)
            if culprit is None and len(indices) > 1:
                logger.warning(
                    "a measuring process died (%s) outside any one setting; measuring its %d settings one per process",
                    status,
                    len(indices),
                )
                for i in indices:
                    run([i])
                return
            i = indices[culprit or 0]
            results[i] = StepTiming(math.inf, status)
            indices = [j for j in indices if j != i]

    run(list(range(len(settings))))
    timings = [t if t is not None else StepTiming(math.inf, "crashed (no answer)") for t in results]
    _log_timings(settings, timings)
    return ChildMeasurement(timings, spent["children"], round(spent["overhead"], 3), tuple(crashes), spent["threads"])


def probe_step_in_child(setting: StepSetting, *, seed: int = 0, fault_spec: str | None = None) -> StepTiming:
    """One training step of ``setting`` (no warm-up) in a child process: does it run, or crash its process?

    For :mod:`medseg.training`, before a run trusts a reduced precision on the CPU. Costs the child's start
    (:data:`CHILD_START_SECONDS`), building the network and one step.

    Returns:
        The :class:`StepTiming` (``crashed`` when the step killed the child, out of memory, or measured).
    """
    return measure_in_child(
        [setting], 1, warmup=0, seed=seed, progress=False, cheap_seconds=0.0, fault_spec=fault_spec
    ).timings[0]


#: What the measuring child runs: the parent's ``sys.path`` (first pickle on stdin), then :func:`_child_main`.
_CHILD_CODE = (
    "import pickle, sys; sys.path[:] = pickle.load(sys.stdin.buffer); "
    "from medseg.planning.step_child import _child_main; _child_main(int(sys.argv[1]))"
)


def _run_child(
    settings: Sequence[StepSetting],
    steps: int,
    warmup: int,
    seed: int,
    progress: bool,
    cheap_seconds: float,
    fault_spec: str,
) -> tuple[list[StepTiming] | None, int | None, str, float, int | None]:
    """Time ``settings`` in one child process (a fresh interpreter: ``sys.executable -c``).

    The child reads its arguments from stdin and answers on a pipe of its own: ``("at", i)`` before it
    builds or steps setting ``i``, then ``("ok", (timings, threads), seconds busy)`` or ``("error",
    exception, seconds busy)``. A fresh interpreter, not ``multiprocessing``'s spawn, so that the parent's main
    module (a user's script without an ``if __name__ == "__main__"`` guard) is never run again in it.

    Returns:
        ``(timings, None, "", overhead seconds, the child's threads)`` when the child answered; ``(None, index
        of the setting it died in or None, "crashed (...)", 0.0, None)`` when it died.

    Raises:
        Exception: the child's own exception (not a crash).
    """
    args = (list(settings), steps, warmup, seed, progress, cheap_seconds, torch.get_num_threads(), fault_spec)
    read_fd, write_fd = os.pipe()
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD_CODE, str(write_fd)], stdin=subprocess.PIPE, pass_fds=(write_fd,)
        )
    finally:
        os.close(write_fd)
    conn = Connection(read_fd, writable=False)
    current, reply = -1, None
    try:
        assert proc.stdin is not None
        try:
            proc.stdin.write(pickle.dumps(list(sys.path)) + pickle.dumps(args))
            proc.stdin.close()
        except BrokenPipeError:  # died before reading: its exit status says how
            pass
        while reply is None:
            try:
                msg = conn.recv()
            except EOFError:
                break
            if msg[0] == "at":
                current = msg[1]
            else:
                reply = msg
        proc.wait()
    finally:
        conn.close()
        if proc.poll() is None:  # interrupted while waiting
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - t0
    if reply is not None:
        kind, payload, busy = reply
        if kind == "error":
            raise payload
        timings, threads = payload
        return timings, None, "", max(0.0, wall - busy), threads
    return None, (current if 0 <= current < len(settings) else None), _crash_status(proc.returncode), 0.0, None


class _Marker:
    """Tells the parent which setting the child is about to build or step (``("at", i)`` on its pipe)."""

    def __init__(self, conn: Connection) -> None:
        self.conn, self.last = conn, -2

    def __call__(self, i: int) -> None:
        if i != self.last:
            self.conn.send(("at", i))
            self.last = i


def _child_main(fd: int) -> None:
    """The measuring child: read the arguments from stdin, time the settings, answer on pipe ``fd`` (see
    :func:`_run_child`)."""
    t0 = time.perf_counter()
    faulthandler.enable()  # a native crash prints the Python stack of the step that died
    conn = Connection(fd, readable=False)
    settings, steps, warmup, seed, progress, cheap_seconds, threads, fault_spec = pickle.load(sys.stdin.buffer)
    torch.set_num_threads(threads)
    try:
        faults.arm(fault_spec)
        timings = _time_settings(settings, steps, warmup, seed, progress, cheap_seconds, _Marker(conn))
        reply: tuple[str, Any, float] = ("ok", (timings, torch.get_num_threads()), time.perf_counter() - t0)
    except Exception as exc:
        reply = ("error", _picklable(exc), time.perf_counter() - t0)
    conn.send(reply)
    conn.close()


def _picklable(exc: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError("".join(traceback.format_exception(exc)).strip())


def _crash_status(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if name == "SIGKILL":
            return "crashed (SIGKILL: killed, e.g. by the out-of-memory killer)"
        return f"crashed ({name})"
    return f"crashed (exit code {exitcode})"


#: StepSetting is re-exported for the callers of :func:`probe_step_in_child`
__all__ = ["CHILD_START_SECONDS", "ChildMeasurement", "StepSetting", "measure_in_child", "probe_step_in_child"]
