"""Lookahead: the update against a hand computation, exact resume, how a run builds and checkpoints it."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from torch import nn

from medseg.errors import ConfigError
from medseg.training import TrainConfig, load_checkpoint, train
from medseg.training.lookahead import Lookahead
from medseg.training.step import build_optimizer

FAST = dict(iters_per_epoch=3, val_iters=1, num_workers=0, num_threads=1, precision="fp32", seed=3)


def test_update_matches_a_hand_computation():
    # loss 0.5 * w^2 -> gradient w; SGD at lr 0.5 halves w each inner step (all values exact in binary)
    w = nn.Parameter(torch.tensor([1.0]))
    opt = Lookahead(torch.optim.SGD([w], lr=0.5), k=2, alpha=0.5)
    seen = []
    for _ in range(4):
        opt.zero_grad()
        (0.5 * w**2).sum().backward()
        opt.step()
        seen.append(float(w.detach()))
    # fast 1 -> 0.5 -> 0.25; sync: slow 1 + 0.5 * (0.25 - 1) = 0.625, fast = slow
    # fast 0.625 -> 0.3125 -> 0.15625; sync: slow 0.625 + 0.5 * (0.15625 - 0.625) = 0.390625
    assert seen == [0.5, 0.625, 0.3125, 0.390625]
    assert opt.fast_steps == 4 and opt.slow is not None and float(opt.slow[0]) == 0.390625


def test_alpha_one_is_the_inner_optimizer_and_bad_settings_are_refused():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    plain = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    wrapped = Lookahead(torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), k=2, alpha=1.0)
    x = torch.randn(4, 3)
    for _ in range(2):
        for model, opt in ((a, plain), (b, wrapped)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    for k, alpha in ((0, 0.5), (5, 0.0), (5, 1.5)):
        with pytest.raises(ValueError, match="Lookahead"):
            Lookahead(torch.optim.SGD(a.parameters(), lr=0.1), k=k, alpha=alpha)


def _model_and_optimizer() -> tuple[nn.Module, Lookahead]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv3d(3, 2, 1))
    return model, Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-2), k=3, alpha=0.5)


def _steps(model: nn.Module, opt: Lookahead, first: int, last: int) -> None:
    for i in range(first, last):
        g = torch.Generator().manual_seed(100 + i)  # batch i is a function of i only
        x, y = torch.randn(2, 1, 4, 4, 4, generator=g), torch.randint(0, 2, (2, 4, 4, 4), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_resume_after_k_plus_2_steps_is_bit_for_bit_the_uninterrupted_run():
    k = 3
    straight, opt = _model_and_optimizer()
    _steps(straight, opt, 0, 3 * k)

    first, opt1 = _model_and_optimizer()
    _steps(first, opt1, 0, k + 2)  # stopped between two synchronisations, slow != fast
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    torch.manual_seed(99)  # a fresh process: other initial weights, before the checkpoint is loaded
    resumed = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv3d(3, 2, 1))
    opt2 = Lookahead(torch.optim.AdamW(resumed.parameters(), lr=1e-2), k=3, alpha=0.5)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    assert opt2.fast_steps == k + 2
    _steps(resumed, opt2, k + 2, 3 * k)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_plain_optimizer_state_does_not_load_into_lookahead():
    model, opt = _model_and_optimizer()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(KeyError):
        opt.load_state_dict(plain.state_dict())


def test_build_optimizer_wraps_the_inner_optimizer_with_its_defaults():
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, TrainConfig(optimizer="lookahead-sgd", lookahead_k=7, lookahead_alpha=0.25))
    assert isinstance(opt, Lookahead) and isinstance(opt.inner, torch.optim.SGD)
    assert (opt.k, opt.alpha) == (7, 0.25)
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["momentum"] == 0.99  # epoch-based SGD
    budget = build_optimizer(model, TrainConfig(optimizer="lookahead-adamw", time_budget_minutes=5))
    assert isinstance(budget, Lookahead) and isinstance(budget.inner, torch.optim.AdamW)
    assert budget.param_groups[0]["lr"] == 3e-3  # the time-budget AdamW default
    assert type(build_optimizer(model, TrainConfig(optimizer="adamw"))) is torch.optim.AdamW
    with pytest.raises(ConfigError, match="lookahead_k"):
        TrainConfig(optimizer="lookahead-adamw", lookahead_k=0).validate()


def test_a_lookahead_run_checkpoints_its_state_and_resumes(tiny_work):
    cfg = TrainConfig(epochs=1, final_validation=False, optimizer="lookahead-adamw", lookahead_k=2, **FAST)
    run = train(tiny_work, cfg)
    state = load_checkpoint(run / "checkpoint_latest.pt")["optimizer"]
    assert state["lookahead"]["fast_steps"] == 3 and len(state["lookahead"]["slow"]) > 0
    assert "exp_avg" in str(state["inner"]["state"][0].keys())
    train(tiny_work, dataclasses.replace(cfg, epochs=2), resume=True)
    assert load_checkpoint(run / "checkpoint_latest.pt")["optimizer"]["lookahead"]["fast_steps"] == 6
