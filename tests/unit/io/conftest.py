"""Fixtures: small valid datasets (MSD and nnU-Net v2 layouts) in ``tmp_path``."""

from __future__ import annotations

from pathlib import Path

import pytest

from ._builders import write_msd, write_nnunet


@pytest.fixture
def msd(tmp_path: Path) -> Path:
    return write_msd(tmp_path / "msd")


@pytest.fixture
def nnunet(tmp_path: Path) -> Path:
    return write_nnunet(tmp_path / "nnunet")
