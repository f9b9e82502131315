"""Checkpoints: atomic save, safe load, clear errors for corrupt/truncated/foreign files, RNG states."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from medseg.errors import CheckpointError
from medseg.io.checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng_state,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
)


def _state() -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {"w": torch.arange(6.0)},
        "epoch": 3,
        "iteration": 30,
        "train_config": {"fold": 0},
        "plan": {},
        "configuration": "3d_fullres",
        "arch": "unet",
        "rng": capture_rng_state(),
        "history": [{"epoch": 1, "train_loss": 0.5}],
    }


def test_round_trip_with_weights_only(tmp_path):
    path = tmp_path / "run" / "checkpoint_latest.pt"
    save_checkpoint(_state(), path)
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt["model"]["w"], torch.arange(6.0))
    assert ckpt["epoch"] == 3 and ckpt["history"][0]["train_loss"] == 0.5
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint_latest.pt"]  # no temporary left


def test_rng_state_restores_every_generator():
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "foreign", "missing_keys", "pickled_object"])
def test_bad_checkpoints_raise_checkpoint_error(tmp_path, kind):
    path = tmp_path / "checkpoint_latest.pt"
    if kind == "truncated":
        save_checkpoint(_state(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(b"\x00\x01 this is not a checkpoint" * 50)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif kind == "missing_keys":
        torch.save({"format": CHECKPOINT_FORMAT, "model": {}}, path)
    else:
        torch.save({"format": CHECKPOINT_FORMAT, "evil": pickle.dumps}, path)  # needs unpickling code objects
    with pytest.raises(CheckpointError, match="checkpoint_latest.pt"):
        load_checkpoint(path)


def test_missing_checkpoint_and_stale_temporaries(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / ".tmp_ckpt_abc.pt").write_bytes(b"half a checkpoint")
    assert remove_stale_temporaries(tmp_path) == 1
    assert not list(tmp_path.iterdir())
