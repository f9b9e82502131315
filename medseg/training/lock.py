"""One training process per run folder: ``run_dir/.lock``, held with ``flock`` for the whole run.

Two ``medseg train`` of the same configuration, architecture and fold would overwrite each other's
checkpoints; the second one is refused with a message naming the first (pid, host, start time). The lock
is an ``flock`` on ``run_dir/.lock``, so the kernel releases it when its process dies, even by
``kill -9``; the file itself (pid, host, time) stays behind then, and the next run takes the lock over
with a warning naming the process that did not finish. A finished run removes the file.

Limitation: on file systems where ``flock`` is not shared between machines (some network file systems),
two runs on different hosts are not kept apart.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from medseg.errors import ConfigError
from medseg.io.workdir import RunDir

logger = logging.getLogger(__name__)

LOCK_NAME = RunDir.LOCK


def _describe(owner: dict) -> str:
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}"


def _read_owner(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        owner = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except ValueError:
        owner = {"pid": "?", "host": "?", "started": "? (unreadable lock file)"}
    return owner if isinstance(owner, dict) else {}


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, (int, float, str)):  # a JSON value int() refuses: null, list, object
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Context manager holding ``run_dir/.lock`` (see the module docstring).

    Args:
        run_dir: the run folder; created if needed.
        enabled: False makes it a no-op (non-zero ranks of a distributed run, which rank 0 covers).

    Raises:
        ConfigError: on entering, when another live process holds the lock.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.path = RunDir(run_dir).lock
        self.enabled = enabled
        self.fd: int | None = None
        self.created = False  # whether entering created the run folder (removed again when left empty)

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise ConfigError(
                    f"{self.path.parent}: another `medseg train` is training this run ({_describe(owner)}); "
                    f"wait for it to finish or stop it (lock file {self.path})"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file between our open and flock: try again
        previous = _read_owner(fd)
        if previous:
            state = (
                "no longer running"
                if previous.get("host") == socket.gethostname() and not _pid_alive(previous.get("pid"))
                else "not holding it"
            )
            logger.warning(
                "%s: taking over the lock left by a run that did not finish (%s, %s)",
                self.path,
                _describe(previous),
                state,
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode("utf-8"))
        os.fsync(fd)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: a waiting process re-checks the inode
        finally:
            os.close(self.fd)  # releases the flock
            self.fd = None
        if self.created:
            try:
                self.path.parent.rmdir()  # a run that failed before writing anything leaves no empty folder
            except OSError:
                pass
