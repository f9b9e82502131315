"""Run the fault catalogue of ``tests/faults`` and print what each fault does: exit code, message, data lost.

    python scripts/bench_faults.py [--root DIR] [--keep]

Every scenario of :data:`tests.faults.catalogue.SCENARIOS` runs the real ``medseg`` command line on a tiny
synthetic dataset, injects its fault (``kill -9`` from outside, a fault armed through ``MEDSEG_FAULT_INJECT``
(see :mod:`medseg.faults`), or bad input), checks the same invariants as the tests and reports one row per
fault. A violated invariant is reported in the row (``INVARIANT VIOLATED``) and makes the script exit 1.
Prints a Markdown table (the one in ``docs/reliability.md``), the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.faults import catalogue  # noqa: E402 - the repository root goes on the path first


def machine() -> str:
    """``lscpu`` model name and the CPU cores this process may use."""
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), model)
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="scratch folder (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="medseg_faults_"))
    t0 = time.perf_counter()
    env = catalogue.prepare(root / "env")
    setup = time.perf_counter() - t0
    rows: list[catalogue.Outcome] = []
    seconds: list[tuple[str, float]] = []
    failed = 0
    for scenario in catalogue.SCENARIOS:
        t = time.perf_counter()
        try:
            rows += scenario(env)
        except AssertionError as exc:
            failed += 1
            where = traceback.extract_tb(exc.__traceback__)[-1]
            first = (str(exc).strip().splitlines() or [where.line or "?"])[0]
            first += f" ({Path(where.filename).name}:{where.lineno})"
            rows.append(catalogue.Outcome(scenario.__name__, "?", f"INVARIANT VIOLATED: {first}", "?", "?"))
        seconds.append((scenario.__name__, time.perf_counter() - t))
    total = time.perf_counter() - t0

    print(
        f"Machine: {machine()}; {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; "
        f"python {platform.python_version()}"
    )
    print(
        f"Command: python scripts/bench_faults.py ({total:.0f} s: setup {setup:.0f} s, "
        + ", ".join(f"{name} {s:.0f} s" for name, s in seconds)
        + ")\n"
    )
    print("| fault | exit code | message (first line) | data lost | recovery |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {_cell(r.fault)} | {_cell(r.exit_code)} | {_cell(r.message)} | {_cell(r.data_lost)} | "
            f"{_cell(r.recovery)} |"
        )
    if not args.keep and args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    if failed:
        print(f"\n{failed} scenario(s) violated an invariant", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
