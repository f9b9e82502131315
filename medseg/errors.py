"""Exception types. Every expected user mistake raises a subclass of :class:`MedsegError`.

The CLI catches :class:`MedsegError`, prints its message (no traceback) and exits non-zero.
"""

from __future__ import annotations

from collections.abc import Sequence


class MedsegError(Exception):
    """Base class for errors caused by user input (bad data, bad plan, bad arguments)."""


class DatasetError(MedsegError):
    """A dataset failed validation. ``problems`` lists every problem found, one line each."""

    def __init__(self, problems: list[str], header: str = "dataset validation failed") -> None:
        self.problems = list(problems)
        lines = [f"{header} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class PlanError(MedsegError):
    """A plan file is missing, malformed or internally inconsistent."""


class CheckpointError(MedsegError):
    """A checkpoint is missing, truncated, corrupt or belongs to another model."""


class ConfigError(MedsegError):
    """Invalid command-line or configuration option."""


class TrainingError(MedsegError):
    """Training cannot go on (it diverged: gradients stayed non-finite step after step)."""


class BundleError(MedsegError):
    """A model bundle (``medseg export``) is missing, truncated, corrupt, incomplete or of a newer format."""


class DicomError(MedsegError):
    """A DICOM file or series cannot be used (unreadable, not an image, inconsistent slices, wrong grid)."""


def raise_for_problems(problems: Sequence[str], error: type[MedsegError], header: str) -> None:
    """Raise ``error`` with ``"<header>:"`` and one ``"  - <problem>"`` line per problem, unless there are none."""
    if problems:
        raise error(f"{header}:\n" + "\n".join(f"  - {p}" for p in problems))
