"""Only medseg/io/workdir.py spells the work folder's layout: a scan of the string literals of medseg/.

Docstrings, comments and messages may name its files; code that builds a path or a file name of the work folder,
a run folder or a model bundle asks :mod:`medseg.io.workdir` instead.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import medseg

PACKAGE = Path(medseg.__file__).resolve().parent
OWNER = Path("io/workdir.py")

#: Layout names, as they appear inside a string literal (or a literal part of an f-string).
LAYOUT = re.compile(
    r"\b(plans|splits|best|postprocessing|postprocessing_prior|progress|config|run_record|fingerprint|dataset_ref|manifest"
    r"|preprocessing|training_range)\.json\b|\bMODEL_CARD\.md\b|training_log\.txt|training_curves\.png|\bmodel\.pt\b"
    r"|^checkpoint_$|checkpoint_(latest|best|final)\b|checkpoint_\*|^fold_$|\bfold_(\d|all\b|\*)"
    r"|^(runs|preprocessed|validation|_from_|\.lock)$|\b(runs|preprocessed|validation|members)/"
)
#: The start of a name that an f-string completes (``f"... checkpoint_{name}.pt"``), also inside prose.
PREFIX = re.compile(r"(checkpoint_|fold_|_from_)$")

#: Files that may still spell a layout name, and why (keep this short).
ALLOWED: set[Path] = set()


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def layout_literals(path: Path) -> list[tuple[int, str]]:
    """``(line, literal)`` of the string literals of ``path`` that spell a layout name.

    Docstrings are skipped, and so is prose (a literal with whitespace) that names a whole file for people;
    prose that ends in a name an f-string completes (``"no checkpoint_"``) is a path being formatted.
    """
    tree = ast.parse(path.read_text(), str(path))
    skip = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value
            prose = any(c.isspace() for c in text)  # a message naming a whole file, as a docstring may
            if (not prose and LAYOUT.search(text)) or PREFIX.search(text):
                hits.append((node.lineno, text))
    return sorted(hits)


def test_only_workdir_spells_the_layout():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel == OWNER or rel in ALLOWED:
            continue
        found += [f"medseg/{rel}:{line}: {text!r}" for line, text in layout_literals(path)]
    assert not found, "work-folder layout spelled outside medseg/io/workdir.py:\n" + "\n".join(found)


def test_the_scan_sees_the_owner_and_ignores_docstrings(tmp_path):
    assert layout_literals(PACKAGE / OWNER)  # the scan would find what workdir.py spells
    probe = tmp_path / "probe.py"
    probe.write_text(
        '"""WORK/runs/<c>/<a>/fold_0/plans.json"""\nx = 1\ny = f"{x}/checkpoint_{x}.pt"\n'
        'z = f"no plans.json in {x}"\nw = f"{x}: no checkpoint_{x}.pt"\nv = "runs"\n'
    )
    assert layout_literals(probe) == [(3, "/checkpoint_"), (5, ": no checkpoint_"), (6, "runs")]
