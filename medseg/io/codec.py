"""One dataclass <-> JSON codec, driven by the dataclasses' type annotations.

:func:`to_json_dict` turns a dataclass into Python builtins only (dicts with string keys, lists, str, int,
float, bool, None) that :func:`json.dumps` writes as they are; :func:`from_json_dict` reads them back into
the dataclass, converting each value by its field's annotation, so that
``from_json_dict(type(x), to_json_dict(x)) == x``.

Supported annotations: nested dataclasses; ``tuple[X, ...]`` and ``tuple[X, Y]`` (nested tuples too, written
as lists); ``list[X]``; ``dict[K, V]`` (``int`` keys are written as strings and read back as ints);
``X | None`` and other unions (the first arm that reads the value wins); :class:`~enum.StrEnum` s (written
as their strings); ``int``, ``float`` (an integer is read as a float), ``bool``, ``str``; ``Any``
(passed through as it is; written as builtins). A field that is absent from the data takes its default.

Every problem of a document (unknown keys, missing required keys, values of the wrong type) is reported
at once, each with its dotted path (``plan.configurations.3d_fullres.spacing``), in one error of the
caller's type (:class:`~medseg.errors.PlanError`, :class:`~medseg.errors.ConfigError` ...). A single
problem reads exactly like the loaders' messages before the codec: ``"<where>: unknown key(s) [...];
allowed: [...]"``, ``"<where>: missing key 'name'"``.

What a document needs beyond this (a schema version check, leaving out keys that are None, migrating old
keys) stays with its class: check or rewrite the dict before :func:`from_json_dict` / after
:func:`to_json_dict`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any, TypeVar, Union

from medseg.errors import MedsegError

T = TypeVar("T")


class _Problem(Exception):
    """A value that does not fit its annotation (collected, never raised out of this module)."""


def to_json_dict(obj: Any) -> Any:
    """``obj`` (a dataclass, or any value a dataclass field holds) as JSON-ready Python builtins.

    Dataclasses become dicts of their fields in declaration order, tuples and lists become lists, dict
    keys become strings, StrEnum members their strings, numpy arrays nested lists and numpy scalars Python
    numbers.

    Raises:
        TypeError: a value JSON cannot hold (an object that is none of the above).
    """
    if isinstance(obj, enum.Enum):
        return obj.value
    if obj is None or isinstance(obj, (bool, str, int, float)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {_key(k): to_json_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_dict(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy array or scalar: nested lists, Python numbers
        return obj.tolist()
    raise TypeError(f"cannot write a {type(obj).__name__} as JSON: {obj!r}")


def from_json_dict(cls: type[T], data: Any, where: str, error: type[MedsegError] = MedsegError) -> T:
    """The dataclass ``cls`` read from JSON-ready builtins (inverse of :func:`to_json_dict`).

    Args:
        cls: a dataclass type; its field annotations (strings under ``from __future__ import annotations``)
            are resolved in its module.
        data: a dict (the parsed JSON object).
        where: the document's name, the root of every dotted path in error messages (``"plan"``).
        error: the error type to raise.

    Returns:
        A new ``cls``.

    Raises:
        error: ``data`` does not fit ``cls``: one line per problem, each naming its dotted path.
    """
    problems: list[str] = []
    value: T | None = _read_dataclass(cls, data, where, problems)
    if problems:
        raise error(problems[0] if len(problems) == 1 else "\n".join(problems))
    assert value is not None  # a dataclass not read comes with a problem
    return value


# -------------------------------------------------------------------- reading
def _read_dataclass(cls: type, data: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{where}: expected an object, got {type(data).__name__}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        problems.append(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    before = len(problems)
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{where}: missing key {name!r}")
            continue
        kwargs[name] = _read(hints[name], data[name], f"{where}.{name}", problems)
    if unknown or len(problems) > before:
        return None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a __post_init__ refusing the values
        problems.append(f"{where}: {exc}")
        return None


def _read(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    """``value`` converted to annotation ``tp``; a mismatch is appended to ``problems`` (None returned)."""
    try:
        return _convert(tp, value, where, problems)
    except _Problem as exc:
        problems.append(f"{where}: {exc}")
        return None


def _convert(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for arm in arms:
            trial: list[str] = []
            try:
                result = _convert(arm, value, where, trial)
            except _Problem:
                continue
            if not trial:
                return result
        if len(arms) == 1:  # X | None: the problems of X
            return _convert(arms[0], value, where, problems)
        raise _Problem(f"expected {_name(tp)}, got {value!r}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _read_dataclass(tp, value, where, problems)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise _Problem(f"expected one of {[m.value for m in tp]}, got {value!r}") from None
    if origin is tuple:
        items = _sequence(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_read(args[0], v, f"{where}[{i}]", problems) for i, v in enumerate(items))
        if len(items) != len(args):
            raise _Problem(f"expected {len(args)} values, got {len(items)}")
        return tuple(_read(a, v, f"{where}[{i}]", problems) for i, (a, v) in enumerate(zip(args, items)))
    if origin is list:
        item = args[0] if args else Any
        return [_read(item, v, f"{where}[{i}]", problems) for i, v in enumerate(_sequence(value))]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Problem(f"expected an object, got {type(value).__name__}")
        key_tp, value_tp = args if args else (Any, Any)
        return {_convert_key(key_tp, k): _read(value_tp, v, f"{where}.{k}", problems) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Problem(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Problem(f"expected integers, got {value!r}")  # the words of the plan loader
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Problem(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Problem(f"expected a string, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise _Problem(f"expected null, got {value!r}")
    raise TypeError(f"{where}: the codec cannot read annotation {tp!r}")  # a programming error


def _sequence(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise _Problem(f"expected a list, got {type(value).__name__}")


def _convert_key(tp: Any, key: Any) -> Any:
    if tp is int and isinstance(key, str):
        try:
            return int(key)
        except ValueError:
            raise _Problem(f"expected integer keys, got {key!r}") from None
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(key)
        except ValueError:
            raise _Problem(f"expected keys among {[m.value for m in tp]}, got {key!r}") from None
    return key


def _key(k: Any) -> str:
    return k.value if isinstance(k, enum.Enum) else str(k)


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


__all__ = ["from_json_dict", "to_json_dict"]
