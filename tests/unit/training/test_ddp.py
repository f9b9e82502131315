"""Data-parallel training with two gloo processes equals one process at the same global batch."""

from __future__ import annotations

import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from medseg.training import TrainConfig, load_checkpoint, train

CFG = TrainConfig(
    epochs=3,
    iters_per_epoch=1,
    val_iters=1,
    batch_size=4,
    num_workers=0,
    num_threads=1,
    precision="fp32",
    final_validation=False,
    seed=5,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, work: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    train(work, CFG)


@pytest.mark.slow
def test_two_gloo_processes_follow_the_single_process_trajectory(tiny_work, tmp_path):
    single_work = tmp_path / "single"
    shutil.copytree(tiny_work, single_work)
    single = load_checkpoint(train(single_work, CFG) / "checkpoint_final.pt")

    mp.spawn(_rank_main, args=(2, _free_port(), str(tiny_work)), nprocs=2, join=True)
    run = tiny_work / "runs" / "3d_fullres" / "unet" / "fold_0"
    ddp = load_checkpoint(run / "checkpoint_final.pt")

    assert ddp["iteration"] == single["iteration"] == 3
    ddp_losses = [h["train_loss"] for h in ddp["history"]]
    single_losses = [h["train_loss"] for h in single["history"]]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4)
    for k, v in single["model"].items():
        assert torch.allclose(ddp["model"][k].float(), v.float(), rtol=1e-4, atol=1e-5), k
    # only rank 0 wrote: one set of outputs, no stray files
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [
            "config.json",
            "run_record.json",
            "plans.json",
            "checkpoint_latest.pt",
            "checkpoint_best.pt",
            "checkpoint_final.pt",
            "training_log.txt",
            "training_curves.png",
            "progress.json",
        ]
    )
