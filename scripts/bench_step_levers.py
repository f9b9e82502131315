"""Training-step time of the CPU levers, side by side, on this machine (and with oneDNN limited to AVX2).

Usage::

    .venv/bin/python scripts/bench_step_levers.py --plan plans/hippocampus.json --isa native avx2

One row per lever: the hippocampus 3d_fullres U-Net as the 30-minute CPU budget fit picks it (16 base
features, 40x56x40, batch 4, fp32 - bf16 autocast too where the CPU has native bf16 - channels-last) and
variants of it. Every setting is built once, warmed up, then timed round-robin (``--rounds`` rounds), so
a changing load affects all alike; the median is reported, with samples per second and the ratio to the
baseline. ``--isa avx2`` reruns the table in a child process with ``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``: the code path of an AVX2-only CPU (no native bf16), not its
speed. The step is :func:`medseg.planning.reference_step.training_step` (forward, Dice + CE over the deep-supervision
outputs, backward, SGD step). ``--compile`` adds ``torch.compile`` of the network (fp32, and bf16 where
the CPU has it), timed in the same rounds; the first-step column shows the compilation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def _levers(base, bf16: bool, with_compile: bool):
    """(name, network plan, precision, channels_last, mkldnn, compiled) of every timed setting."""
    rows = [
        ("baseline: 16f b4 fp32 channels-last", base, "fp32", True, True, False),
        ("channels-last off", base, "fp32", False, True, False),
        ("oneDNN off (ATen's own convolutions)", base, "fp32", True, False, False),
        ("batch 2", replace(base, batch_size=2), "fp32", True, True, False),
        (
            "12 base features",
            replace(base, spec=replace(base.spec, base_features=12, max_features=120)),
            "fp32",
            True,
            True,
            False,
        ),
        (
            "full-resolution stage 8 channels",
            replace(base, spec=replace(base.spec, options={**base.spec.options, "full_res_features": 8})),
            "fp32",
            True,
            True,
            False,
        ),
        (
            "deep supervision off",
            replace(base, spec=replace(base.spec, deep_supervision=False)),
            "fp32",
            True,
            True,
            False,
        ),
    ]
    if with_compile:
        rows.append(("torch.compile", base, "fp32", True, True, True))
    if bf16:
        rows.append(("bf16 autocast", base, "bf16", False, True, False))
        if with_compile:
            rows.append(("bf16 autocast + torch.compile", base, "bf16", False, True, True))
    return rows


def _table(plan_path: Path, rounds: int, with_compile: bool) -> str:
    from medseg.machine import cpu_has_fast_bf16
    from medseg.planning.plan import Plan
    from medseg.planning.reference_step import make_optimizer, training_step

    plan = Plan.from_json(plan_path.read_text())
    cfg = plan.configurations["3d_fullres"]
    default = cfg.networks[cfg.default_arch]
    base = replace(
        default,
        spec=replace(default.spec, base_features=16, max_features=160),
        batch_size=4,
        patch_size=tuple(cfg.patch_size),
    )
    K = plan.num_classes
    built = []
    for name, net, precision, cl, mkldnn, compiled in _levers(base, cpu_has_fast_bf16(), with_compile):
        torch.manual_seed(0)
        model = net.build(1, K).train()
        x = torch.randn((net.batch_size, 1, *net.patch_size))
        t = torch.randint(0, K, (net.batch_size, *net.patch_size))
        if cl:
            model = model.to(memory_format=torch.channels_last_3d)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        opt = make_optimizer(model)
        built.append(
            [name, torch.compile(model) if compiled else model, opt, x, t, precision, mkldnn, net.batch_size, []]
        )
    for _ in range(rounds + 1):  # the first round warms up (and compiles)
        for row in built:
            _, model, opt, x, t, precision, mkldnn, _, times = row
            torch.backends.mkldnn.enabled = mkldnn
            t0 = time.perf_counter()
            training_step(model, opt, x, t, K, precision)
            times.append(time.perf_counter() - t0)
    torch.backends.mkldnn.enabled = True
    ref_rate = built[0][7] / statistics.median(built[0][8][1:])  # the baseline's samples/s
    lines = [
        f"capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
        f"median of {rounds} steps",
        "| lever | s/step | samples/s | vs baseline (samples/s) | first step s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, *_, b, times in built:
        med = statistics.median(times[1:])
        lines.append(f"| {name} | {med:.3f} | {b / med:.2f} | {(b / med) / ref_rate:.2f}x | {times[0]:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plan", type=Path, default=Path(__file__).resolve().parents[1] / "plans" / "hippocampus.json")
    p.add_argument("--isa", nargs="+", choices=("native", "avx2"), default=["native", "avx2"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the network")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(_table(args.plan, args.rounds, args.compile), flush=True)
        return 0
    for isa in args.isa:
        env = dict(os.environ, **(AVX2_ENV if isa == "avx2" else {}))
        cmd = [sys.executable, __file__, "--child", "--plan", str(args.plan), "--rounds", str(args.rounds)]
        if args.compile:
            cmd.append("--compile")
        print(f"## {isa}", flush=True)
        subprocess.run(cmd, env=env, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
