"""Memory of one training step, estimated by simulation and measured for real.

The planner needs, for a candidate patch and batch size, the memory one training step takes: forward
and backward at the planned precision, parameters, gradients and SGD momentum, every tensor autograd
keeps for backward, and the loss, target and input. Instead of per-architecture reference constants,
:func:`estimate_training_memory_gb` *runs the real network* -- the same modules, the same autocast
policy, the same loss and optimizer step -- on fake tensors (``torch._subclasses.FakeTensorMode``:
shapes, dtypes and strides without data, so a run costs the same few hundred milliseconds at any patch
size) and simulates the allocator: a dispatch mode sees every tensor any operator allocates, counts
its storage once (views and in-place results share it), and releases it when the storage dies. The peak
of the live bytes is the estimate. Results are cached per (topology, patch, batch, precision, channels,
classes).

Operators also need scratch memory the dispatcher never sees: oneDNN reorders a contiguous input into
its blocked layout, copies strided inputs, and keeps per-thread weight-gradient buffers. These
*workspaces* are added while the convolution runs, from rules measured on oneDNN (CPU; see
:func:`conv_workspace_bytes`); for CUDA the same rules stand in for cuDNN's workspace (not calibrated on a
GPU). Not counted: the CUDA context (several hundred MB) and the caching allocator's fragmentation, for
which a planner sizing a GPU should keep a margin. The estimate describes a step in the default
(contiguous) memory format; against the real CPU peak (:func:`measure_training_peak_gb`) it agreed
within 3% for every architecture from 16^3 to 40x56x40 patches, 8 to 320 features, 1 and 2 threads;
a channels-last step skips most reorders and needs up to ~15% less (see the tests and
``scripts/bench_networks.py``).

The step is the planner's reference step (:func:`medseg.planning.reference_step.training_step`: soft
Dice + cross-entropy over the deep-supervision outputs, SGD with Nesterov momentum); a trainer with a
different but similar loss needs about the same memory.

All sizes are in GiB (2**30 bytes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from medseg.options import DeviceKind
from medseg.planning.plan import NetworkPlan
from medseg.planning.reference_step import make_optimizer, training_step

logger = logging.getLogger(__name__)

GIB = float(2**30)

#: per (plan without batch size, channels, classes): {batch size: live-bytes trace of a simulated step}
_TRACES: dict[str, dict[int, list[int]]] = {}
_LOCK = threading.Lock()
_MAX_CACHED_PLANS = 256


def estimate_training_memory_gb(
    net: NetworkPlan, in_channels: int, num_classes: int, *, device: str = DeviceKind.CPU, threads: int | None = None
) -> float:
    """Estimated peak memory of one training step of ``net`` at ``net.patch_size``/``net.batch_size``.

    Counts parameters (float32), gradients, SGD momentum, every activation autograd saves, temporaries
    alive at the peak, the loss, the input ``(B, C, *patch)`` float32 and the target ``(B, *patch)``
    int64, at ``net.precision`` (autocast for bf16/fp16).

    Args:
        net: network plan; ``patch_size``, ``batch_size``, ``precision`` and the topology are used.
        in_channels: input channels ``C``.
        num_classes: output classes ``K`` (including background).
        device: ``"cpu"`` or ``"cuda"``: the device whose operator workspaces are modelled.
        threads: CPU threads of the training process (oneDNN keeps per-thread weight-gradient buffers);
            default ``torch.get_num_threads()``. Ignored for CUDA.

    Returns:
        Peak memory in GiB. A simulation takes a few tenths of a second whatever the patch size; results
        are cached, and once two batch sizes of the same plan have been simulated every other batch
        size is derived exactly without simulating (every tensor's size is either independent of the
        batch or proportional to it, and the sequence of operations does not depend on it).

    Raises:
        ConfigError: the network cannot be built (unknown arch, inconsistent plan).
    """
    device_type = torch.device(device).type
    threads = 1 if device_type != DeviceKind.CPU else (threads or torch.get_num_threads())
    key = _cache_key(net, in_channels, num_classes, device_type, threads)
    batch = net.batch_size
    with _LOCK:
        traces = dict(_TRACES.get(key, {}))
    if batch in traces:
        return max(traces[batch]) / GIB
    if len(traces) >= 2:
        (b1, t1), (b2, t2) = list(traces.items())[:2]
        if len(t1) == len(t2):
            return max(a + (b - a) * (batch - b1) / (b2 - b1) for a, b in zip(t1, t2)) / GIB
    trace = _simulate_trace(net, in_channels, num_classes, threads)
    with _LOCK:
        if len(_TRACES) >= _MAX_CACHED_PLANS:
            _TRACES.clear()
        _TRACES.setdefault(key, {})[batch] = trace
    logger.debug(
        "simulated training step of %s %s batch %d: %.3f GiB", net.arch, list(net.patch_size), batch, max(trace) / GIB
    )
    return max(trace) / GIB


def measure_training_peak_gb(
    net: NetworkPlan,
    in_channels: int,
    num_classes: int,
    device: str | torch.device = DeviceKind.CPU,
    channels_last: bool = False,
) -> float:
    """Run one real training step (after a warm-up step) and return its measured peak memory in GiB.

    CPU: the live bytes before the step (parameters, momentum, input, target) plus the highest running
    total of the allocations and frees ``torch.profiler`` records during the step. CUDA:
    ``torch.cuda.max_memory_allocated`` over the step.

    Args:
        net: network plan (patch, batch, precision, topology).
        in_channels: input channels ``C``.
        num_classes: output classes ``K``.
        device: ``"cpu"`` or a CUDA device.
        channels_last: run model and input in the channels-last memory format.

    Returns:
        Peak memory in GiB.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    model = net.build(in_channels, num_classes).to(device)
    model.train()
    x = torch.randn((net.batch_size, in_channels, *net.patch_size), generator=gen).to(device)
    target = torch.randint(0, num_classes, (net.batch_size, *net.patch_size), generator=gen).to(device)
    if channels_last:
        fmt = torch.channels_last_3d if net.dims == 3 else torch.channels_last
        model = model.to(memory_format=fmt)  # type: ignore[call-overload]  # accepted at run time; not in the stubs
        x = x.contiguous(memory_format=fmt)
    optimizer = make_optimizer(model)
    training_step(model, optimizer, x, target, num_classes, net.precision)  # momentum buffers, kernel caches
    if device.type == DeviceKind.CUDA:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        training_step(model, optimizer, x, target, num_classes, net.precision)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / GIB

    state = list(model.parameters()) + list(model.buffers()) + _optimizer_tensors(optimizer)
    baseline = _tensor_bytes(state + [x, target])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        training_step(model, optimizer, x, target, num_classes, net.precision)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return (baseline + peak) / GIB


# ---------------------------------------------------------------------------------------- simulation
_CONV = torch.ops.aten.convolution.default
_CONV_BACKWARD = torch.ops.aten.convolution_backward.default


def conv_workspace_bytes(func: Callable[..., Any], args: Sequence[Any], threads: int) -> int:
    """Scratch memory a (transposed) convolution needs beyond its inputs and outputs, in bytes.

    Rules read off oneDNN on the CPU with ``torch.profiler`` (``convolution`` / ``convolution_backward``
    with default-layout tensors):

    * forward: the input is reordered into oneDNN's blocked layout (one input-sized buffer; none for a
      channels-last input); transposed: two output-sized buffers;
    * backward: one input-sized buffer (two for a strided convolution, whose input is also copied), or
      per-thread weight-gradient buffers of about four weights each, whichever is larger; transposed:
      one buffer the size of the incoming gradient plus one the size of the input.

    Args:
        func: the aten operator (``aten.convolution.default`` or ``aten.convolution_backward.default``).
        args: its positional arguments.
        threads: intra-op threads.

    Returns:
        Bytes (0 for any other operator).
    """
    if func is _CONV:
        x, w, transposed = args[0], args[1], args[6]
        if transposed:
            out = _conv_transpose_out_bytes(x, w, args[3])
            return 2 * out
        fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        channels_last = x.is_contiguous(memory_format=fmt) and not x.is_contiguous()
        return 0 if channels_last else _nbytes(x)
    if func is _CONV_BACKWARD:
        grad_out, x, w, stride, transposed = args[0], args[1], args[2], args[4], args[7]
        if transposed:
            return _nbytes(grad_out) + _nbytes(x)
        strided = any(s > 1 for s in stride)
        return max((2 if strided else 1) * _nbytes(x), 4 * threads * _nbytes(w))
    return 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _conv_transpose_out_bytes(x: torch.Tensor, w: torch.Tensor, stride: Sequence[int]) -> int:
    # kernel == stride in medseg's decoders; the general formula is only needed for the size estimate
    spatial = [(n - 1) * s + k for n, s, k in zip(x.shape[2:], stride, w.shape[2:])]
    n = x.shape[0] * w.shape[1]
    for v in spatial:
        n *= v
    return n * x.element_size()


class _PeakTracker(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch's __init_subclass__ is unannotated
    """Dispatch mode counting the bytes of every storage an operator allocates while it is alive, plus
    the convolution workspaces of :func:`conv_workspace_bytes`."""

    def __init__(self, threads: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # TorchDispatchMode.__init__ is unannotated
        self.threads = threads
        self.live = 0
        self.trace: list[int] = []  # live bytes after each allocation (and during each workspace)
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen.add(key)
                    self.live += nbytes
                    self.trace.append(self.live)
                    weakref.finalize(storage, self._release, key, nbytes)
        if func is _CONV or func is _CONV_BACKWARD:
            self.trace.append(self.live + conv_workspace_bytes(func, args, self.threads))
        return out


def _simulate_trace(net: NetworkPlan, in_channels: int, num_classes: int, threads: int) -> list[int]:
    """Total live bytes after every allocation of a simulated training step (last entry: the SGD step)."""
    with FakeTensorMode() as mode:
        model = _build_fake(net, in_channels, num_classes, mode)
        model.train()
        x = torch.empty((net.batch_size, in_channels, *net.patch_size), dtype=torch.float32)
        target = torch.zeros((net.batch_size, *net.patch_size), dtype=torch.int64)
        params = list(model.parameters())
        # steady state: the SGD momentum buffers (one per parameter) exist before the step
        baseline = 2 * _tensor_bytes(params) + _tensor_bytes(list(model.buffers()) + [x, target])
        tracker = _PeakTracker(threads)
        with tracker:
            training_step(model, None, x, target, num_classes, net.precision)
            # the (single-tensor) SGD step, done analytically rather than op by op: gradients are all
            # live, and the weight-decay and Nesterov updates make two temporaries of one parameter
            largest = max((p.numel() * p.element_size() for p in params), default=0)
            tracker.trace.append(tracker.live + 2 * largest)
    return [baseline + v for v in tracker.trace]


def _build_fake(net: NetworkPlan, in_channels: int, num_classes: int, mode: FakeTensorMode) -> nn.Module:
    """``net``'s module with fake parameters and buffers (``mode`` active).

    Built directly under ``mode`` (no memory, no data) where the constructor allows; a constructor that reads a
    tensor's value (MONAI's SwinUNETR turns a ``torch.linspace`` into Python floats) builds a real CPU module
    first, whose parameters and buffers are then replaced by fake copies and freed.
    """
    try:
        return net.build(in_channels, num_classes)
    except DataDependentOutputException:
        logger.debug("%s reads tensor values while it is built; building it for real to simulate it", net.arch)
    with unset_fake_temporarily():
        model = net.build(in_channels, num_classes)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(mode.from_tensor(p), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = mode.from_tensor(b)
    return model


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def _cache_key(net: NetworkPlan, in_channels: int, num_classes: int, device_type: str, threads: int) -> str:
    fields = dataclasses.asdict(net)
    fields.pop("estimated_memory_gb", None)
    fields.pop("batch_size", None)
    return json.dumps([fields, in_channels, num_classes, device_type, threads], sort_keys=True, default=str)
