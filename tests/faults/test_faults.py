"""Faults and bad input at every stage, through the real ``medseg`` command line (one test per scenario).

Each scenario of :data:`tests.faults.catalogue.SCENARIOS` asserts its own invariants (exit code, one clear
message naming the file, no traceback, nothing half-written, recovery by rerun or ``--resume``);
``scripts/bench_faults.py`` runs the same scenarios and prints the table in ``docs/reliability.md``.
"""

from __future__ import annotations

import pytest

from tests.faults.catalogue import SCENARIOS, Env

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__ for s in SCENARIOS])
def test_fault(scenario, fault_env: Env) -> None:
    rows = scenario(fault_env)
    assert rows and all(r.exit_code and r.message for r in rows)
