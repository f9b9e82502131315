"""Disk-backed scratch arrays: a case's large ``(K, z, y, x)`` buffers on a memory map instead of in RAM.

When a case's memory plan (:mod:`medseg.inference.memory_plan`) exceeds the budget, the sliding window's
logit accumulators and the members' probabilities are allocated here: each buffer is an unlinked temporary
file (it disappears with the process, even one that is killed) mapped into memory. The pages a computation
touches count towards the process's resident memory until they are given back, so every user of these
buffers reports what it touched (:meth:`ScratchSpace.touched`); once ``window_bytes`` are touched, every
mapping of the space drops its resident pages (``madvise(MADV_DONTNEED)``: written pages stay in the file
and the page cache, which the kernel may reclaim, and are read back on the next access). The arithmetic is
the same as on an ordinary buffer of the same dtype, so results are identical.

:func:`release_pages` gives back the pages of any array that lives on a scratch mapping (a no-op for
ordinary arrays), for code that reads such arrays without knowing where they live
(:mod:`medseg.inference.case_grid`, one class at a time).
"""

from __future__ import annotations

import logging
import mmap
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}

#: Live scratch mappings: (start address, size in bytes, weak reference to the mapped array).
_live: list[tuple[int, int, weakref.ref[np.ndarray]]] = []
_live_lock = threading.Lock()


def _drop(array: np.ndarray) -> None:
    """Give the resident pages of a mapped array back (its data stays in the file)."""
    base: Any = array
    while base is not None and not isinstance(base, mmap.mmap):  # ndarray views, then the buffer's memoryview
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    if isinstance(base, mmap.mmap):
        try:
            base.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # closed mapping, or a platform without madvise
            pass


class ScratchSpace:
    """Disk-backed buffers for one case, resident memory kept to about ``window_bytes`` of touched pages.

    Args:
        directory: where the (unlinked) files are created; None = the system's temporary folder. Prefer a
            folder on disk: a ``tmpfs`` folder holds its files in memory.
        window_bytes: bytes of pages the users may touch between two releases (:meth:`touched`).
    """

    def __init__(self, directory: str | Path | None, window_bytes: int) -> None:
        self.directory = None if directory is None else Path(directory)
        self.window_bytes = max(1, int(window_bytes))
        self._arrays: list[weakref.ref[np.ndarray]] = []
        self._touched = 0
        self._lock = threading.Lock()
        self.allocated_bytes = 0

    def zeros(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A zero-filled CPU tensor of ``shape`` and ``dtype`` (float32 or float16) on a memory-mapped file.

        Raises:
            OSError: the folder is not writable or the disk is full.
        """
        np_dtype = _NUMPY_DTYPES[dtype]
        count = int(np.prod(shape))
        nbytes = max(1, count * np.dtype(np_dtype).itemsize)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(prefix=".medseg-scratch-", dir=self.directory) as f:
            f.truncate(nbytes)  # a sparse file: reads as zeros, takes disk space only where written
            mapped = mmap.mmap(f.fileno(), nbytes)  # keeps its own handle; the file is already unlinked
        array = np.frombuffer(mapped, dtype=np_dtype, count=count).reshape(tuple(int(s) for s in shape))
        ref = weakref.ref(array)
        with self._lock:
            self._arrays = [a for a in self._arrays if a() is not None] + [ref]
            self.allocated_bytes += nbytes
        with _live_lock:
            _live[:] = [e for e in _live if e[2]() is not None]
            _live.append((array.ctypes.data, array.nbytes, ref))
        return torch.from_numpy(array)

    def touched(self, nbytes: int) -> None:
        """Report ``nbytes`` of scratch pages touched; releases every mapping once ``window_bytes`` add up."""
        with self._lock:
            self._touched += int(nbytes)
            due = self._touched >= self.window_bytes
        if due:
            self.release()

    def release(self) -> None:
        """Drop the resident pages of every live buffer of this space (their contents stay)."""
        with self._lock:
            arrays = [a() for a in self._arrays]
            self._touched = 0
        for array in arrays:
            if array is not None:
                _drop(array)


def release_pages(array: np.ndarray | torch.Tensor) -> None:
    """Drop the resident pages of the scratch mapping ``array`` lives on; nothing for an ordinary array."""
    address = array.data_ptr() if isinstance(array, torch.Tensor) else array.__array_interface__["data"][0]
    with _live_lock:
        owners = [ref() for start, size, ref in _live if start <= address < start + size]
    for owner in owners:
        if owner is not None:
            _drop(owner)


#: Bytes of a ``(K, z, y, x)`` buffer that whole-buffer steps (softmax, the members' sum) process at once: Z slabs
#: of at most this size (at least one slice), in memory and on a scratch space alike. The same slabs give the
#: same floating-point results (a vectorised loop rounds its scalar tail differently, so slabs of another
#: size could differ in the last bit), and on a scratch space at most this much is touched between releases.
SLAB_BYTES = 64 * 2**20


def z_slabs(buffer: torch.Tensor) -> list[slice]:
    """The Z slabs (slices of axis 1) of a ``(K, Z, ...)`` buffer that :data:`SLAB_BYTES` allows."""
    per_slice = max(1, buffer[:, :1].numel() * buffer.element_size())
    rows = max(1, SLAB_BYTES // per_slice)
    return [slice(z0, min(buffer.shape[1], z0 + rows)) for z0 in range(0, buffer.shape[1], rows)]


def in_slabs(
    total: torch.Tensor, scratch: ScratchSpace | None, op: Callable[[torch.Tensor, Any], Any], other: Any
) -> torch.Tensor:
    """``op(total, other)`` in place, Z slab by Z slab (:func:`z_slabs`), ``other`` a tensor of ``total``'s
    shape or a number; on a scratch space the pages touched are reported. Returns ``total``."""
    for z in z_slabs(total):
        op(total[:, z], other[:, z] if isinstance(other, torch.Tensor) else other)
        if scratch is not None:
            scratch.touched(total[:, z].numel() * total.element_size() * 2)
    return total


__all__ = ["SLAB_BYTES", "ScratchSpace", "in_slabs", "release_pages", "z_slabs"]
