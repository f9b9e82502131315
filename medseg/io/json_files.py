"""Reading JSON documents (plans, fingerprints) with errors that name what failed and where."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from medseg.errors import MedsegError

T = TypeVar("T")


def parse_json(text: str, what: str, error: type[MedsegError] = MedsegError) -> Any:
    """``json.loads(text)``.

    Raises:
        error: ``"<what> is not valid JSON: <reason>"``.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON: {exc}") from None


def load_json_file(
    path: str | Path, parse: Callable[[str], T], missing: str, error: type[MedsegError] = MedsegError
) -> T:
    """``parse`` the text of ``path`` (e.g. a ``from_json`` class method).

    Raises:
        error: ``"<path>: <missing>"`` when the file does not exist; an ``error`` raised by ``parse`` again,
            with ``"<path>: "`` in front of its message.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        return parse(path.read_text())
    except error as exc:
        raise error(f"{path}: {exc}") from None
