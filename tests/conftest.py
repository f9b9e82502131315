"""Shared fixtures: small synthetic NIfTI datasets and paths to the real shared data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _progress_bars_back_on():
    """A ``main([..., "-q"])`` turns progress bars off for the process; the next test starts with them on."""
    yield
    from medseg.progress import set_progress

    set_progress(True)


@pytest.fixture
def synthetic_dataset(tmp_path: Path) -> Path:
    """A 6-case synthetic MSD dataset (anisotropic, oblique) written to ``tmp_path/data``."""
    from medseg.io.synthetic import generate_synthetic_dataset

    return generate_synthetic_dataset(tmp_path / "data", num_cases=6, seed=0)


@pytest.fixture
def shared_data() -> Path:
    """Root of the read-only real data (``../shared/data``); fails (never skips) when it is missing."""
    assert SHARED_DATA.is_dir(), (
        f"real data folder {SHARED_DATA} is missing (expected ../shared/data beside the checkout)"
    )
    return SHARED_DATA


def shared_dataset(name: str) -> Path:
    """Path of a read-only real dataset in ``../shared/data``; fails (never skips) when it is missing."""
    path = SHARED_DATA / name
    assert path.is_dir(), f"real data folder {path} is missing (expected ../shared/data beside the checkout)"
    return path


@pytest.fixture
def hippocampus_subset(tmp_path: Path):
    """Copy ``n`` real hippocampus cases into a temporary MSD dataset and return its root."""
    import json

    def make(n: int = 10, start: int = 0) -> Path:
        src = shared_dataset("hippocampus")
        meta = json.loads((src / "dataset.json").read_text())
        entries = meta["training"][start : start + n]
        dst = tmp_path / f"hippo_{start}_{n}"
        (dst / "imagesTr").mkdir(parents=True)
        (dst / "labelsTr").mkdir()
        for e in entries:
            for key in ("image", "label"):
                rel = e[key].lstrip("./")
                shutil.copy(src / rel, dst / rel)
        meta["training"] = entries
        meta["numTraining"] = len(entries)
        (dst / "dataset.json").write_text(json.dumps(meta, indent=1))
        return dst

    return make
