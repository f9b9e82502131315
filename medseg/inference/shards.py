"""One folder's cases split among processes: ``torchrun`` ranks or ``medseg predict --part K/N``.

Every process lists the same input folder and computes the same split without talking to the others:
:func:`assign_shards` sorts the cases by voxel count (read from the image headers, :func:`case_voxels`;
largest first, ties by case id) and gives each to the shard with the fewest voxels so far (ties: the lowest
shard), so the shards' work differs by at most one case's. The split is over every case of the folder,
predicted or not, so processes that start at different moments still agree; a rerun skips the finished cases
of its shard.

Folder-level files (``OUT/prediction_record.json``, ``OUT/instances.json``) are never written by two processes:
a shard writes its own part, ``<name>.part-K-of-N.json`` (``K`` 1-based), and :func:`merge_parts` folds the
parts into ``<name>.json`` and removes them: rank 0 after the ranks' barrier, or the next plain
``medseg predict`` into the folder (which also predicts any case a part left undone).
"""

from __future__ import annotations

import heapq
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import SimpleITK as sitk

from medseg.errors import ConfigError
from medseg.io.image import atomic_write_text

logger = logging.getLogger(__name__)

_PART = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Which share of a folder's cases this process predicts.

    Attributes:
        index: 0-based (a ``torchrun`` rank; ``--part K/N`` is index ``K - 1``).
        count: how many shares (the world size; ``N``).
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"a part must be K/N with 1 <= K <= N, got {self.index + 1}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """The shard of ``--part K/N`` (``K`` 1-based: ``1/4`` ... ``4/4``, as a Slurm array ``--array=1-4``).

        Raises:
            ConfigError: not ``K/N`` with ``1 <= K <= N``.
        """
        m = _PART.match(text)
        if m is None:
            raise ConfigError(f"--part must be K/N (e.g. 1/4; K from 1 to N), got {text!r}")
        return cls(int(m.group(1)) - 1, int(m.group(2)))

    @property
    def label(self) -> str:
        """``part K of N`` (1-based)."""
        return f"part {self.index + 1} of {self.count}"

    def part_path(self, path: Path) -> Path:
        """This shard's part of the folder file ``path``: ``DIR/<stem>.part-K-of-N<suffix>``."""
        return path.with_name(f"{path.stem}.part-{self.index + 1}-of-{self.count}{path.suffix}")


def case_voxels(image_files: Sequence[Path]) -> int:
    """Voxels of a case, all channels, read from the image headers only (0 when a header is unreadable)."""
    total = 0
    for f in image_files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(f))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            logger.debug("%s: header unreadable; counted as 0 voxels for the split", f)
            continue
        n = 1
        for s in reader.GetSize():
            n *= int(s)
        total += n
    return total


def assign_shards(sizes: Mapping[str, int], count: int) -> list[list[str]]:
    """Split cases into ``count`` shards of about equal total size (greedy, largest case first).

    Args:
        sizes: case id -> its size (voxels).
        count: number of shards (>= 1; more shards than cases leaves some empty).

    Returns:
        Per shard, its case ids sorted; every case in exactly one shard. The same for the same input, on
        every process.
    """
    shards: list[list[str]] = [[] for _ in range(count)]
    loads = [(0, i) for i in range(count)]  # (voxels so far, shard): the heap's smallest is the next shard
    for case_id in sorted(sizes, key=lambda c: (-sizes[c], c)):
        load, i = heapq.heappop(loads)
        shards[i].append(case_id)
        heapq.heappush(loads, (load + sizes[case_id], i))
    return [sorted(s) for s in shards]


class ShardCase(Protocol):
    """What :func:`select_shard` reads of a case (:class:`medseg.io.dataset.Case`)."""

    @property
    def case_id(self) -> str: ...

    @property
    def image_files(self) -> tuple[Path, ...]: ...


C = TypeVar("C", bound=ShardCase)


def select_shard(cases: Sequence[C], shard: Shard) -> list[C]:
    """The cases (in their order) that :func:`assign_shards` gives ``shard``, by their voxels."""
    sizes = {c.case_id: case_voxels(c.image_files) for c in cases}
    mine = set(assign_shards(sizes, shard.count)[shard.index])
    chosen = [c for c in cases if c.case_id in mine]
    logger.info(
        "%s: %d of %d case(s), %.1f of %.1f Mvoxels",
        shard.label,
        len(chosen),
        len(cases),
        sum(sizes[c] for c in mine) / 1e6,
        sum(sizes.values()) / 1e6,
    )
    return chosen


def part_paths(path: Path) -> list[Path]:
    """The shard parts of the folder file ``path`` that exist (``<stem>.part-K-of-N<suffix>``), sorted."""
    pattern = re.compile(rf"^{re.escape(path.stem)}\.part-\d+-of-\d+{re.escape(path.suffix)}$")
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if pattern.match(p.name) and p.is_file())


def _read_document(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        logger.warning("%s: cannot read it (%s); its cases are left out of the merge", path, exc)
        return None
    return document if isinstance(document, dict) and isinstance(document.get("cases"), dict) else None


def merged_cases(path: Path) -> dict[str, Any]:
    """The ``cases`` of the folder file ``path`` and of its parts together (a part's entry wins)."""
    cases: dict[str, Any] = {}
    for p in ([path] if path.is_file() else []) + part_paths(path):
        document = _read_document(p)
        if document is not None:
            cases.update(document["cases"])
    return cases


def merge_parts(path: Path, rebuild: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]) -> bool:
    """Fold the shard parts of the folder file ``path`` into it (atomically) and remove the parts.

    Each file is a JSON object with a ``cases`` mapping; the merged ``cases`` are the union (a part's entry
    wins over the folder file's, a later part's over an earlier one's).

    Args:
        path: the folder file, e.g. ``OUT/prediction_record.json``.
        rebuild: ``(last document read, merged cases) -> document to write`` (recomputes any summary).

    Returns:
        True when there were parts to merge.
    """
    parts = part_paths(path)
    if not parts:
        return False
    head: dict[str, Any] = {}
    for p in ([path] if path.is_file() else []) + parts:
        document = _read_document(p)
        if document is not None:
            head = document
    cases = merged_cases(path)
    atomic_write_text(path, json.dumps(rebuild(head, dict(sorted(cases.items()))), indent=1) + "\n")
    for p in parts:
        p.unlink(missing_ok=True)
    logger.info("%s: merged %d part(s), %d case(s)", path, len(parts), len(cases))
    return True


__all__ = [
    "Shard",
    "ShardCase",
    "assign_shards",
    "case_voxels",
    "merge_parts",
    "merged_cases",
    "part_paths",
    "select_shard",
]
