"""The rank helpers read what ``torchrun`` sets, and a plain process is rank 0 of 1 without a process group."""

from __future__ import annotations

from medseg.distributed import DistContext, init_distributed, launch_local_rank, launch_rank, launch_world_size


def test_a_plain_process_is_rank_0_of_1(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (launch_rank(), launch_world_size(), launch_local_rank()) == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")  # a stray RANK without a world is not a rank
    assert launch_rank() == 0
    assert init_distributed("cpu") == DistContext() and not DistContext().enabled


def test_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (launch_rank(), launch_world_size(), launch_local_rank()) == (5, 8, 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert launch_local_rank() == 5
    assert DistContext(rank=1, world_size=3).batch_slice(8) == (3, 6)
