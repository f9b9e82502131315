"""Reading JSON documents (plans, fingerprints, training settings) with errors that name what failed and where."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from medseg.errors import MedsegError

T = TypeVar("T")

logger = logging.getLogger(__name__)


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
    path: str | Path,
    parse: Callable[[Any], T],
    what: str,
    error: type[MedsegError] = MedsegError,
    missing: str | None = None,
) -> T:
    """Read the JSON document ``path`` and ``parse`` its value (e.g. a ``from_dict`` class method).

    Args:
        path: the file.
        parse: the parsed JSON value (dict, list, ...) -> the object; an ``error`` it raises is raised again
            with ``"<path>: "`` in front of its message.
        what: the document in words (``"plan"``, ``"training configuration"``), for the messages.
        error: the error type raised.
        missing: the message when ``path`` is not a file (e.g. ``"plan file not found (run `medseg plan`
            first)"``); None = reported like any file that cannot be read.

    Returns:
        What ``parse`` returns.

    Raises:
        error: ``"<path>: <missing>"``; ``"<path>: cannot read the <what> (<reason>)"`` when the file cannot be
            read or is not valid JSON; an ``error`` of ``parse`` with ``"<path>: "`` in front.
    """
    path = Path(path)
    if missing is not None and not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: cannot read the {what} (not valid JSON: {exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read the {what} ({exc})") from None
    try:
        return parse(value)
    except error as exc:
        raise error(f"{path}: {exc}") from None


def read_case_table(path: Path, format_name: str, what: str) -> dict[str, Any]:
    """The ``cases`` of an earlier per-folder table (``{"format": ..., "cases": {case id: {...}}}``), to extend.

    A table that cannot be used is not an error: the run starts a new one, with one warning naming the file.

    Args:
        path: e.g. ``OUT/statistics.json``.
        format_name: the ``format`` the document must declare.
        what: the table in words, for the warning (``"statistics"``, ``"instance table"``).

    Returns:
        case id -> entry (entries that are not objects left out); empty when there is no usable file.
    """
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("%s: cannot read the earlier %s (%s); starting a new one", path, what, exc)
        return {}
    if not isinstance(document, dict) or document.get("format") != format_name:
        logger.warning("%s: not a %s document; starting a new %s", path, format_name, what)
        return {}
    cases = document.get("cases")
    return {k: v for k, v in cases.items() if isinstance(v, dict)} if isinstance(cases, dict) else {}
