"""Fixtures of the fault-injection suite: the data every scenario of :mod:`tests.faults.catalogue` shares."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tests.faults.catalogue")

from tests.faults.catalogue import Env, prepare  # noqa: E402 - after registering the assertion rewrite


@pytest.fixture(scope="session")
def fault_env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    """A planned and a trained 2-channel work folder, 4 cases to predict with their reference outputs, and a
    trained work folder of another dataset (built once per session, through the real CLI)."""
    return prepare(tmp_path_factory.mktemp("faults"))
