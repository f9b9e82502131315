"""Progress bars: every tqdm bar medseg draws goes through :func:`progress_bar`, so one switch turns them all off.

The CLI's ``--quiet`` ("only warnings and errors") calls :func:`set_progress(False) <set_progress>`; a library
caller may do the same. A call site's own ``disable`` (e.g. ``disable=not progress``, or not the main rank) still
applies: a bar shows only when both allow it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

__all__ = ["progress_bar", "progress_enabled", "set_progress"]

T = TypeVar("T")

_enabled = True


def set_progress(enabled: bool) -> None:
    """Turn every later progress bar of this process on or off."""
    global _enabled
    _enabled = bool(enabled)


def progress_enabled() -> bool:
    """Whether progress bars are on (:func:`set_progress`)."""
    return _enabled


def progress_bar(iterable: Iterable[T] | None = None, *, disable: bool = False, **kwargs: Any) -> tqdm[T]:
    """``tqdm(iterable, **kwargs)``, disabled when ``disable`` or when progress bars are off."""
    return tqdm(iterable, disable=disable or not _enabled, **kwargs)
