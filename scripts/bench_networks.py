"""Benchmark one training step of every architecture on this machine and print a table.

Per architecture at a patch (default: hippocampus-like 40 x 56 x 40, batch 2; or the patch a plan gives
it with ``--plan``): median training-step time, wall clock and process CPU (forward, Dice+CE loss,
backward, SGD step) for fp32 and bf16 autocast, each with channels-last off and on; the measured peak
memory of the step (torch.profiler on CPU, ``max_memory_allocated`` on CUDA) and the memory model's
estimate (which models the default layout).

    python scripts/bench_networks.py                              # all archs, 40x56x40, batch 2
    python scripts/bench_networks.py --archs unet --patch 64 64 64 --batch 2 --steps 5
    python scripts/bench_networks.py --plan WORK/plans.json --config 3d_fullres

On a CPU without native bf16 (no AVX512-BF16/AMX: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is
False) bf16 convolutions fall back to slow reference kernels; the script says so and still measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch

from medseg.networks import NetworkSpec, accepted_spec, available_networks
from medseg.planning.memory import GIB, estimate_training_memory_gb, measure_training_peak_gb
from medseg.planning.plan import NetworkPlan, Plan
from medseg.planning.reference_step import make_optimizer, training_step
from medseg.planning.topology import compute_topology, round_up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=None, help="architectures (default: all registered)")
    p.add_argument("--patch", nargs="+", type=int, default=[40, 56, 40], help="patch size (Z Y X) or (Y X)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=3)
    p.add_argument("--base-features", type=int, default=32)
    p.add_argument("--max-features", type=int, default=320)
    p.add_argument("--plan", default=None, help="plans.json: use each architecture's planned network instead")
    p.add_argument("--config", default=None, help="configuration of --plan (default: the plan's default)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument(
        "--memory-formats", nargs="+", default=["contiguous", "channels_last"], choices=["contiguous", "channels_last"]
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def simple_topology(patch: list[int]) -> tuple[tuple[int, ...], tuple, tuple]:
    """(patch, kernel sizes, strides) the planner's topology rule gives ``patch`` at isotropic spacing."""
    t = compute_topology((1.0,) * len(patch), tuple(patch))
    return t.patch_size, t.kernel_sizes, t.strides


def networks(args: argparse.Namespace) -> list[tuple[NetworkPlan, int, int]]:
    archs = args.archs or available_networks()
    if args.plan:
        plan = Plan.load(args.plan)
        cfg = plan.configuration(args.config)
        return [(cfg.network(a), plan.num_channels, plan.num_classes) for a in archs]
    patch, kernels, strides = simple_topology(args.patch)
    if tuple(patch) != tuple(args.patch):
        print(f"note: patch {args.patch} rounded up to {list(patch)} (divisible by the total stride)")
    nets = []
    for a in archs:  # each architecture's nearest accepted topology (MONAI's networks), the patch rounded up to it
        spec = accepted_spec(
            NetworkSpec(
                arch=a,
                kernel_sizes=kernels,
                strides=strides,
                base_features=args.base_features,
                max_features=args.max_features,
            )
        )
        arch_patch = tuple(round_up(p, t) for p, t in zip(patch, spec.total_stride()))
        nets.append(
            (NetworkPlan(spec, patch_size=arch_patch, batch_size=args.batch), args.in_channels, args.num_classes)
        )
    return nets


def time_steps(net: NetworkPlan, cin: int, k: int, precision: str, channels_last: bool, args) -> tuple[float, float]:
    """Median wall-clock and process CPU seconds of one training step (CPU time is the steadier number on
    a shared machine; with several threads it adds up the threads)."""
    device = torch.device(args.device)
    model = net.build(cin, k).to(device)
    x = torch.randn(net.batch_size, cin, *net.patch_size, device=device)
    target = torch.randint(0, k, (net.batch_size, *net.patch_size), device=device)
    if channels_last:
        fmt = torch.channels_last_3d if net.dims == 3 else torch.channels_last
        model = model.to(memory_format=fmt)
        x = x.contiguous(memory_format=fmt)
    opt = make_optimizer(model)
    wall, cpu = [], []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        training_step(model, opt, x, target, k, precision)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bf16_native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 (oneDNN) {bf16_native}"
    )
    if "bf16" in args.precisions and args.device == "cpu" and not bf16_native:
        print("warning: no native bf16 on this CPU; bf16 convolutions use slow reference kernels")
    header = (
        f"{'arch':8s} {'patch':>12s} {'B':>2s} {'params':>8s} {'prec':5s} {'layout':13s} "
        f"{'step s':>7s} {'cpu s':>7s} {'vox/s':>7s} {'peak MiB':>8s} {'est MiB':>7s} {'est/peak':>8s}"
    )
    print(header)
    print("-" * len(header))
    for net0, cin, k in networks(args):
        n_params = sum(p.numel() for p in net0.build(cin, k).parameters())
        for precision in args.precisions:
            net = dataclasses.replace(net0, precision=precision)
            est = estimate_training_memory_gb(net, cin, k) * GIB / 2**20
            for layout in args.memory_formats:
                cl = layout == "channels_last"
                step, cpu = time_steps(net, cin, k, precision, cl, args)
                peak = measure_training_peak_gb(net, cin, k, args.device, channels_last=cl) * GIB / 2**20
                voxels = net.batch_size * torch.Size(net.patch_size).numel()
                print(
                    f"{net.arch:8s} {'x'.join(map(str, net.patch_size)):>12s} {net.batch_size:2d} "
                    f"{n_params / 1e6:7.2f}M {precision:5s} {layout:13s} {step:7.2f} {cpu:7.2f} {voxels / step:7.0f} "
                    f"{peak:8.1f} {est:7.1f} {est / peak:8.2f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
