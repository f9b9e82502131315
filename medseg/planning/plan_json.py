"""plans.json's schema: version history, the version-1 migration and the readable JSON layout.

Conversion between the plan dataclasses and builtins is the one annotation-driven codec
(:mod:`medseg.io.codec`); this module holds what is particular to plans.json. Schema history:

* version 1: a network entry holds its topology fields flat next to ``patch_size``/``batch_size``/
  ``precision``/``estimated_memory_gb``; a configuration repeats its default network's ``patch_size``
  and ``batch_size``.
* version 2: a network entry nests its topology under ``spec``; configurations hold no patch or batch.

:func:`migrate_plan_dict` turns a version-1 dict (from plans.json, a checkpoint or a bundle) into
version 2 before conversion.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from medseg.errors import PlanError

SCHEMA_VERSION = 2

#: NetworkSpec's fields as written flat into a version-1 network entry
_V1_SPEC_KEYS = (
    "arch",
    "kernel_sizes",
    "strides",
    "base_features",
    "max_features",
    "n_conv_per_stage",
    "norm",
    "deep_supervision",
    "options",
)


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
        if not isinstance(default, dict):
            continue
        if _plain(patch, batch) != _plain(default.get("patch_size"), default.get("batch_size")):
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
