"""plans.json <-> plan dataclasses: builtins conversion, readable JSON and the schema migration.

The converter is driven by small tables (which fields nest which dataclass, which are integer, float,
string or nested-integer tuples); :mod:`medseg.planning.plan` passes its classes in, so this module does
not import it. Schema history:

* version 1: a network entry holds its topology fields flat next to ``patch_size``/``batch_size``/
  ``precision``/``estimated_memory_gb``; a configuration repeats its default network's ``patch_size``
  and ``batch_size``.
* version 2: a network entry nests its topology under ``spec``; configurations hold no patch or batch.

:func:`migrate_plan_dict` turns a version-1 dict (from plans.json, a checkpoint or a bundle) into
version 2 before conversion.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from medseg.errors import PlanError

SCHEMA_VERSION = 2

#: NetworkSpec's fields as written flat into a version-1 network entry
_V1_SPEC_KEYS = ("arch", "kernel_sizes", "strides", "base_features", "max_features", "n_conv_per_stage", "norm",
                 "deep_supervision", "options")

_INT_TUPLES = {"patch_size", "median_shape", "original_median_shape", "label_ids"}
_OPTIONAL_INT_TUPLES = {"mirror_axes"}
_FLOAT_TUPLES = {"spacing", "original_median_spacing"}
_NESTED_INT_TUPLES = {"kernel_sizes", "strides", "regions"}
_STR_TUPLES = {"channel_names", "label_names"}

#: (class name, field name) -> ("dict" | "tuple" | "one", nested dataclass)
NestedTable = Mapping[tuple[str, str], tuple[str, type]]


def migrate_plan_dict(d: Any) -> Any:
    """Return plan builtins in the current schema (a version-1 dict is migrated; others pass unchanged).

    Args:
        d: the parsed plans.json object (or the plan embedded in a checkpoint or bundle).

    Returns:
        A new dict in schema version :data:`SCHEMA_VERSION`, or ``d`` itself when it is not version 1.

    Raises:
        PlanError: a version-1 configuration's ``patch_size``/``batch_size`` differ from its default
            network's (the plan was edited inconsistently; version 2 keeps them in one place only).
    """
    if not isinstance(d, dict) or d.get("schema_version") != 1:
        return d
    out = copy.deepcopy(d)
    out["schema_version"] = SCHEMA_VERSION
    configurations = out.get("configurations")
    if not isinstance(configurations, dict):
        return out
    for name, cfg in configurations.items():
        if not isinstance(cfg, dict):
            continue
        where = f"configurations.{name}"
        patch, batch = cfg.pop("patch_size", None), cfg.pop("batch_size", None)
        networks = cfg.get("networks")
        if not isinstance(networks, dict):
            continue
        for arch, net in list(networks.items()):
            if isinstance(net, dict):
                spec = {k: net.pop(k) for k in _V1_SPEC_KEYS if k in net}
                networks[arch] = {"spec": spec, **net}
        default = networks.get(cfg.get("default_arch", "unet"))
        default_sizes = _plain(default.get("patch_size"), default.get("batch_size")) if isinstance(default, dict) else None
        if default_sizes is not None and _plain(patch, batch) != default_sizes:
            raise PlanError(
                f"{where}: patch_size/batch_size ({patch}, {batch}) differ from those of its default network "
                f"({default.get('patch_size')}, {default.get('batch_size')}); this schema-version-1 plan cannot be "
                f"migrated: make them equal (the network's are the ones trained)"
            )
    return out


def _plain(*values: Any) -> list[Any]:
    """Values with tuples as lists (a plan embedded in a checkpoint may hold either)."""
    return [list(v) if isinstance(v, (list, tuple)) else v for v in values]


def dumps_readable(obj: Any, indent: int = 2, _level: int = 0) -> str:
    """``json.dumps`` with indentation, but lists of scalars (and lists of such lists) on one line."""

    def flat(v: Any) -> bool:
        if isinstance(v, list):
            return all(not isinstance(x, (dict, list)) or (isinstance(x, list) and flat(x)) for x in v)
        return False

    pad = " " * (indent * (_level + 1))
    end = " " * (indent * _level)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad}{json.dumps(str(k))}: {dumps_readable(v, indent, _level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    if isinstance(obj, list):
        if flat(obj) and len(json.dumps(obj)) <= 100:
            return json.dumps(obj, separators=(", ", ": "))
        if not obj:
            return "[]"
        items = [pad + dumps_readable(v, indent, _level + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + end + "]"
    return json.dumps(obj)


def to_builtin(obj: Any) -> Any:
    """Dataclasses, dicts, tuples and numpy scalars as plain dicts, lists and Python scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_builtin(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_builtin(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return obj.item()
    return obj


def from_builtin(cls: type, d: Any, where: str, nested: NestedTable) -> Any:
    """Build dataclass ``cls`` from builtins ``d``, refusing unknown and missing keys.

    Args:
        cls: the dataclass to build.
        d: its builtins (a dict).
        where: path of ``d`` in the plan, for messages.
        nested: which fields hold nested dataclasses (see :data:`NestedTable`).

    Raises:
        PlanError: ``d`` is no object, has unknown or missing keys, or a value of the wrong kind.
    """
    if not isinstance(d, dict):
        raise PlanError(f"{where}: expected an object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise PlanError(f"{where}: missing key {name!r}")
            continue
        kwargs[name] = _convert(cls, name, d[name], f"{where}.{name}", nested)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise PlanError(f"{where}: {exc}") from None


def _convert(cls: type, name: str, value: Any, where: str, nested: NestedTable) -> Any:
    key = (cls.__name__, name)
    try:
        if key in nested:
            kind, sub_cls = nested[key]
            if kind == "one":
                return from_builtin(sub_cls, value, where, nested)
            if kind == "dict":
                if not isinstance(value, dict):
                    raise PlanError(f"{where}: expected an object")
                return {k: from_builtin(sub_cls, v, f"{where}.{k}", nested) for k, v in value.items()}
            return tuple(from_builtin(sub_cls, v, f"{where}[{i}]", nested) for i, v in enumerate(value))
        if name in _INT_TUPLES:
            return tuple(_as_int(v, where) for v in value)
        if key == ("Plan", "ignore_label"):
            return None if value is None else _as_int(value, where)
        if key in (("Plan", "regions"), ("Plan", "regions_class_order")) and value is None:
            return None
        if key == ("Plan", "regions_class_order"):
            return tuple(_as_int(v, where) for v in value)
        if name in _OPTIONAL_INT_TUPLES:
            return None if value is None else tuple(_as_int(v, where) for v in value)
        if name in _FLOAT_TUPLES:
            return tuple(float(v) for v in value)
        if name in _NESTED_INT_TUPLES:
            return tuple(tuple(_as_int(v, where) for v in row) for row in value)
        if name in _STR_TUPLES:
            return tuple(str(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise PlanError(f"{where}: {exc}") from None
    return value


def _as_int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not float(v).is_integer():
        raise PlanError(f"{where}: expected integers, got {v!r}")
    return int(v)
