"""A per-folder table of ``medseg predict``'s outputs, kept current case by case: ``OUT/<name>.json``.

``instances.json``, ``statistics.json`` and ``quality.json`` are the same kind of file: a JSON object with a
``format`` tag, perhaps a few fields of its own, and ``cases`` (case id -> entry). A :class:`CaseTable` keeps one
of them:

- each finished case rewrites the file atomically, so an interrupted run keeps every case written so far, and a
  rerun extends the earlier table instead of starting over (an unusable earlier file is replaced, with a warning);
- a shard of a split prediction (:class:`~medseg.inference.shards.Shard`) writes only its part,
  ``<name>.part-K-of-N.json``; :meth:`CaseTable.merge_parts` folds the parts into the table (rank 0 after the
  ranks' barrier, or the next plain run, which merges before it predicts);
- files derived from the table (e.g. ``statistics.csv``) are rewritten with it, but never by a shard: they follow
  the merged table.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.inference.shards import Shard, merge_parts, merged_cases
from medseg.io.image import atomic_write_text
from medseg.io.json_files import read_case_table

__all__ = ["CaseTable"]

#: ``cases`` (sorted) -> the document to write.
Document = Callable[[dict[str, Any]], dict[str, Any]]
#: ``cases`` (sorted) -> ``[(path, text), ...]``: files derived from the table.
Derived = Callable[[dict[str, Any]], list[tuple[Path, str]]]


class CaseTable:
    """One per-folder table of case entries (see the module docstring).

    Args:
        path: the table, e.g. ``OUT/statistics.json``.
        format_name: its ``format`` tag; an earlier file with another tag is not extended.
        what: the table in words, for messages (``"statistics"``).
        shard: this process's share of the cases (None: the whole folder; parts left by shards are merged first).
        document: ``cases -> document`` (default ``{"format": format_name, "cases": cases}``).
        derived: files rewritten with the (whole, not a shard's) table.

    Attributes:
        path: the file this process writes (``<name>.part-K-of-N.json`` for a shard).
        cases: every case the folder's table and parts hold, this run's included (what is done already).
    """

    def __init__(
        self,
        path: Path,
        format_name: str,
        what: str,
        shard: Shard | None = None,
        document: Document | None = None,
        derived: Derived | None = None,
    ) -> None:
        self.main = Path(path)
        self.format_name, self.what, self.shard = format_name, what, shard
        self._document: Document = document or (lambda cases: {"format": format_name, "cases": cases})
        self._derived = derived
        self.path = self.main if shard is None else shard.part_path(self.main)
        if shard is None:
            self.merge_parts()
        self._own: dict[str, Any] = read_case_table(self.path, format_name, what)
        self.cases: dict[str, Any] = (
            {**read_case_table(self.main, format_name, what), **merged_cases(self.main)} if shard else dict(self._own)
        )
        self._lock = threading.Lock()

    def record(self, entries: Mapping[str, Any]) -> None:
        """Add or replace the entries of some cases and rewrite the file (thread-safe).

        Raises:
            MedsegError: the file (or a derived one) cannot be written.
        """
        with self._lock:
            self.cases.update(entries)
            self._own.update(entries)
            cases = dict(sorted(self._own.items()))
            files = [(self.path, json.dumps(self._document(cases), indent=1) + "\n")]
            if self.shard is None and self._derived is not None:
                files += self._derived(cases)
            for target, text in files:
                self._write(target, text)

    def merge_parts(self) -> bool:
        """Fold the shards' parts into the table (atomically), remove them and rewrite the derived files.

        Returns:
            True when there were parts to merge.

        Raises:
            MedsegError: a derived file cannot be written.
        """
        if not merge_parts(self.main, lambda _, cases: self._document(cases)):
            return False
        if self._derived is not None:
            for target, text in self._derived(read_case_table(self.main, self.format_name, self.what)):
                self._write(target, text)
        return True

    def _write(self, target: Path, text: str) -> None:
        try:
            atomic_write_text(target, text)
        except OSError as exc:
            raise MedsegError(f"{target}: cannot write the {self.what} ({exc.strerror or exc})") from None
