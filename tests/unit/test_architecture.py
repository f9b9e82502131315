"""The package's layering, read from the imports of its source files (module level, inside functions and under
``TYPE_CHECKING`` alike).

Layers, each importing only those before it (docs/design.md, "Architecture")::

    base (errors, machine, distributed, faults, options, clock, progress) -> io -> fingerprint -> networks -> planning
    -> preprocessing -> inference -> training -> postprocessing | ensembling | evaluation -> face (cli, pipeline, demo)

Inference needs no trainer; the trainer's final validation predicts with inference's sliding window, so inference
sits below training. Packages of one rank (postprocessing, ensembling, evaluation) may not import each other except
where :data:`SAME_RANK_ALLOWED` says so. No two files import each other in a loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "medseg"

#: rank of each part; a module may import parts of a lower rank (and its own part)
RANKS: dict[str, int] = {
    "base": 0,
    "io": 1,
    "fingerprint": 2,
    "networks": 3,
    "planning": 4,
    "preprocessing": 5,
    "inference": 6,
    "training": 7,
    "postprocessing": 8,
    "ensembling": 8,
    "evaluation": 8,
    "face": 9,
}
BASE_MODULES = {"errors", "machine", "distributed", "faults", "options", "clock", "progress", "__init__"}
FACE_MODULES = {"cli", "pipeline", "demo", "__main__"}
#: (importer, imported) pairs of one rank that are part of the design
SAME_RANK_ALLOWED = {("ensembling", "postprocessing"), ("ensembling", "evaluation"), ("postprocessing", "evaluation")}


def part_of(module: str) -> str:
    """The part of a dotted ``medseg.x.y`` module name."""
    head = module.split(".")[1] if module.count(".") else "__init__"
    if head in BASE_MODULES:
        return "base"
    if head in FACE_MODULES:
        return "face"
    assert head in RANKS, f"module {module} belongs to no layer: add its package to RANKS in {__file__}"
    return head


def module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, package: Path = PACKAGE) -> set[str]:
    """Every ``medseg`` module a file imports, anywhere in it (relative imports resolved)."""
    me = module_name(path, package)
    here = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "medseg")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "medseg":
                continue
            found.add(target)
            # `from medseg.x import y` may name the submodule medseg.x.y
            for a in node.names:
                if (package.parent / Path(*f"{target}.{a.name}".split("."))).with_suffix(".py").exists():
                    found.add(f"{target}.{a.name}")
    found.discard(me)
    return found


def layer_violations(package: Path = PACKAGE) -> list[str]:
    """``importer (part) imports imported (part)`` for every import against the layering."""
    wrong = []
    for path in sorted(package.rglob("*.py")):
        me = module_name(path, package)
        mine = part_of(me)
        for other in sorted(imports_of(path, package)):
            theirs = part_of(other)
            if theirs == mine or RANKS[theirs] < RANKS[mine] or (mine, theirs) in SAME_RANK_ALLOWED:
                continue
            wrong.append(f"{me} ({mine}) imports {other} ({theirs})")
    return wrong


def file_cycles(package: Path = PACKAGE) -> list[str]:
    """Loops of files that import each other, each as ``a -> b -> a``."""
    modules = {module_name(p, package): p for p in sorted(package.rglob("*.py"))}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {
        m: {r for i in imports_of(p, package) if (r := resolve(i)) and r != m and not r == "medseg"}
        for m, p in modules.items()
    }
    # a package's __init__ re-exporting its own modules is not a cycle of the design: leave those edges out
    for m in graph:
        graph[m] = {t for t in graph[m] if not (modules[t].name == "__init__.py" and m.startswith(t + "."))}
    cycles, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_every_import_points_down_the_layers():
    wrong = layer_violations()
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_cycles_between_files():
    cycles = file_cycles()
    assert not cycles, "files that import each other in a loop:\n" + "\n".join(cycles)


def test_the_checker_sees_wrong_imports_and_loops(tmp_path):
    """The checks can fail: a network that imports planning inside a function, a relative import from io up to
    training, and the loops this makes (unet <-> plan, plan <-> planner) are all reported."""
    pkg = tmp_path / "medseg"
    files = {
        "__init__.py": "",
        "errors.py": "",
        "networks/__init__.py": "",
        "networks/unet.py": "def build():\n    from medseg.planning.plan import NetworkPlan\n    return NetworkPlan\n",
        "planning/__init__.py": "",
        "planning/plan.py": "from medseg.networks import unet\nfrom . import planner\n",
        "planning/planner.py": "import medseg.planning.plan\nfrom medseg.errors import *\n",
        "training/__init__.py": "",
        "training/trainer.py": "",
        "io/__init__.py": "",
        "io/image.py": "from ..training import trainer\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    assert layer_violations(pkg) == [
        "medseg.io.image (io) imports medseg.training (training)",
        "medseg.io.image (io) imports medseg.training.trainer (training)",
        "medseg.networks.unet (networks) imports medseg.planning.plan (planning)",
    ]
    assert file_cycles(pkg) == [
        "medseg.networks.unet -> medseg.planning.plan -> medseg.networks.unet",
        "medseg.planning.plan -> medseg.planning.planner -> medseg.planning.plan",
    ]
