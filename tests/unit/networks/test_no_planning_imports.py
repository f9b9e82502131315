"""The networks package sits below planning: none of its modules imports planning (or any later layer)."""

from __future__ import annotations

import ast
from pathlib import Path

import medseg.networks

LATER_LAYERS = ("medseg.planning", "medseg.preprocessing", "medseg.training", "medseg.inference", "medseg.cli")


def test_networks_import_no_later_layer():
    offending = []
    for path in sorted(Path(medseg.networks.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            offending += [f"{path.name}:{node.lineno} {n}" for n in names if n.startswith(LATER_LAYERS)]
    assert not offending
