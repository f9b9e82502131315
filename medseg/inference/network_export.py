"""Exporting trained networks to ONNX or TorchScript, with the settings needed to reproduce medseg's prediction.

``medseg export WORK --format onnx -o DIR`` writes, for every network of the ensemble medseg would predict
with (chosen by :func:`medseg.ensembling.bundle_export.export_networks`: find-best's choice by default; a
model bundle works as the source too), with :func:`write_networks`::

    DIR/<config>/<arch>/fold_<k>.onnx             (or fold_<k>.torchscript.pt)
    DIR/inference.json

Each network is in eval mode (no deep-supervision outputs), fp32, takes ``image`` ``(B, C, *patch)``
(normalised intensities on the configuration's grid) and returns ``logits`` ``(B, K, *patch)``; the batch
axis is dynamic, the patch is the planned one. ``inference.json`` records what the rest of medseg's
prediction does around the network (:func:`inference_description`): preprocessing (crop, per-channel
normalisation, spacing), the sliding window (patch, step, Gaussian weighting), test-time mirroring and
shifts, the ensemble mean, label ids and names, and the postprocessing rules.

Every exported network is checked against PyTorch on a random batch of two (onnxruntime for ONNX when it
is installed, ``torch.jit.load`` for TorchScript) and refused when its logits differ.
"""

from __future__ import annotations

import inspect
import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from medseg import __version__
from medseg.errors import ConfigError, MedsegError
from medseg.inference.members import EnsembleMember
from medseg.inference.sliding_window import tta_variants
from medseg.inference.tiling import GAUSSIAN_MIN, gaussian_importance_map
from medseg.io.image import atomic_write_bytes, atomic_write_text
from medseg.planning.plan import dumps_readable

logger = logging.getLogger(__name__)

NetworkFormat = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
INFERENCE_FORMAT = "medseg-inference-v1"
ONNX_OPSET = 17
#: Largest accepted difference between exported and PyTorch logits, relative to the logits' largest magnitude.
CHECK_TOLERANCE = 1e-3
#: Sliding-window step medseg predicts with (``Predictor(step=...)``'s default).
DEFAULT_STEP = 0.5


def check_format(fmt: str) -> None:
    """Refuse an unknown network format, and ONNX without the ``onnx`` package.

    Raises:
        ConfigError: naming the formats, or how to install ``onnx``.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"export format must be one of {['bundle', *FORMATS]}, got {fmt!r}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401  (torch.onnx.export needs it)
        except ImportError:
            raise ConfigError(
                "ONNX export needs the onnx package: pip install 'medseg[onnx]' (or pip install onnx onnxruntime)"
            ) from None


def write_networks(
    members: Sequence[EnsembleMember],
    folds: Sequence[str],
    rules: dict[str, Any] | None,
    output_dir: str | Path,
    fmt: NetworkFormat,
) -> Path:
    """Write every network of an ensemble in ``fmt`` plus ``inference.json`` into ``output_dir``.

    Args:
        members: the networks (not cascades: their input holds the previous stage's segmentation).
        folds: each member's fold name (``fold_0``, ``fold_all``), for the file names.
        rules: the postprocessing rules to record in ``inference.json`` (as given), or None.
        output_dir: folder to write into (created; files of the same names are replaced).
        fmt: ``onnx`` or ``torchscript``.

    Returns:
        The path of ``inference.json``.

    Raises:
        ConfigError: unknown format, or ONNX export without the ``onnx`` package.
        MedsegError: a network that cannot be exported (naming the architecture and why) or whose export
            does not reproduce its logits.
    """
    check_format(fmt)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for member, fold in zip(members, folds):
        rel = f"{member.configuration}/{member.arch}/{fold}{SUFFIXES[fmt]}"
        data = _export_one(member, fmt, f"{member.configuration}/{member.arch}/{fold}")
        atomic_write_bytes(output_dir / rel, data)
        files.append(rel)
        logger.info("wrote %s (%.1f MB)", output_dir / rel, len(data) / 1e6)
    info = inference_description(members, folds, files, fmt, rules)
    path = output_dir / "inference.json"
    atomic_write_text(path, dumps_readable(info) + "\n")
    return path


def _example(member: EnsembleMember, batch: int, seed: int) -> torch.Tensor:
    net = member.stage.network
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, member.plan.num_channels, *net.patch_size), generator=gen)


def _export_one(member: EnsembleMember, fmt: str, name: str) -> bytes:
    """The exported network as bytes, checked against PyTorch on a batch of two."""
    # Module.to takes memory_format at run time; torch's overloads of Module.to leave it out
    model = member.model.eval().float().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    x = _example(member, 1, 0)
    with torch.no_grad():
        out = model(x)
    if not isinstance(out, torch.Tensor):
        raise MedsegError(
            f"cannot export {name}: the {member.arch} network returns {type(out).__name__} in eval "
            "mode, not one logits tensor"
        )
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about shape checks turned into constants
            if fmt == "onnx":
                # the TorchScript exporter (dynamo=False) writes to a file object; the stub allows paths only
                torch.onnx.export(
                    model,
                    (x,),
                    buf,  # type: ignore[arg-type]
                    dynamo=False,
                    opset_version=ONNX_OPSET,
                    input_names=["image"],
                    output_names=["logits"],
                    dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                )
            else:
                torch.jit.save(torch.jit.trace(model, x, check_trace=False), buf)
    except Exception as exc:  # noqa: BLE001 - any exporter failure: name the architecture and why
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise MedsegError(
            f"cannot export {name} to {fmt}: the {member.arch} network uses an operation the "
            f"exporter does not support ({type(exc).__name__}: {first})"
        ) from None
    data = buf.getvalue()
    _check(model, data, fmt, name, _example(member, 2, 1))
    return data


def run_exported(data: bytes, fmt: str, x: np.ndarray) -> np.ndarray | None:
    """Logits of an exported network (``fmt`` bytes) on ``x`` ``(B, C, *patch)``; None for ONNX without
    onnxruntime."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        return session.run(None, {"image": x.astype(np.float32)})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in favour of torch.export
        loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.no_grad():
        return loaded(torch.from_numpy(x)).numpy()


def _check(model: torch.nn.Module, data: bytes, fmt: str, name: str, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_exported(data, fmt, x.numpy())
    if got is None:
        logger.warning("onnxruntime is not installed: %s was exported but not checked against PyTorch", name)
        return
    err = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
    scale = max(1.0, float(np.abs(ref).max()))
    logger.info("%s: %s logits differ from PyTorch's by at most %.2e", name, fmt, err)
    if not err <= CHECK_TOLERANCE * scale:
        raise MedsegError(
            f"cannot export {name} to {fmt}: the exported {model.__class__.__name__} network's logits "
            f"differ from PyTorch's by {err:.3g} (shape {list(got.shape)} vs {list(ref.shape)})"
        )


def inference_description(
    members: Sequence[EnsembleMember],
    folds: Sequence[str],
    files: Sequence[str],
    fmt: str,
    rules: dict[str, Any] | None,
) -> dict[str, Any]:
    """What ``inference.json`` holds: everything medseg does around the exported networks, as builtins."""
    plan = members[0].plan
    sigma = inspect.signature(gaussian_importance_map).parameters["sigma_scale"].default
    entries = []
    for member, fold, file in zip(members, folds, files):
        cfg, net = member.stage.configuration, member.stage.network
        mirror_axes, shifts = tta_variants(member.stage.mirror_axes, member.stage.total_stride)
        entries.append(
            {
                "file": file,
                "configuration": member.configuration,
                "arch": member.arch,
                "fold": fold,
                "dims": cfg.dims,
                "input_layout": "(B, C, Z, Y, X)" if cfg.dims == 3 else "(B, C, Y, X), one Z slice per sample",
                "patch_size": list(net.patch_size),
                "spacing_zyx_mm": list(cfg.spacing),
                "normalization": [
                    {"channel": ch, **asdict(n)} for ch, n in zip(member.plan.channel_names, cfg.normalization)
                ],
                "mirror_axes": list(mirror_axes),
                "shift_variants": [list(s) for s in shifts],
                "total_stride": list(net.total_stride()),
            }
        )
    info: dict[str, Any] = {
        "format": INFERENCE_FORMAT,
        "medseg_version": __version__,
        "network_format": fmt,
        "input": {
            "name": "image",
            "dtype": "float32",
            "values": "normalised intensities on the configuration's grid (see preprocessing)",
            "dynamic_axes": ["batch"],
        },
        "output": {
            "name": "logits",
            "dtype": "float32",
            "layout": "(B, K, *patch)",
            "values": "logits; softmax over axis 1 gives class probabilities, class index i is label_ids[i]",
        },
        "channel_names": list(plan.channel_names),
        "label_ids": list(plan.label_ids),
        "label_names": list(plan.label_names),
        "networks": entries,
        "preprocessing": [
            "crop to the bounding box of the nonzero region (any channel != 0, holes filled)",
            "normalise each channel: ct = clip to [clip_low, clip_high], then (x - mean) / std; zscore = "
            "(x - mean) / std of the image itself (inside the nonzero region when use_nonzero_mask); none = as is",
            "resample to spacing_zyx_mm: third-order spline, in-plane only plus nearest neighbour along a single "
            "coarse axis when max/min spacing > 3",
        ],
        "sliding_window": {
            "step": DEFAULT_STEP,
            "step_meaning": "patch starts spread evenly from 0 to size - patch, at most step * patch apart "
            "(a volume smaller than the patch is zero-padded, centred)",
            "gaussian_sigma_scale": sigma,
            "gaussian_min": GAUSSIAN_MIN,
            "weighting": "logits of every patch (each TTA pass flipped back first, averaged) times a Gaussian "
            "(sigma = gaussian_sigma_scale * patch size per axis, divided by its maximum, at least "
            "gaussian_min); summed, divided by the summed weights, then softmax",
            "tta": "every combination of flips over mirror_axes (patch axes), and the whole volume again "
            "moved by each of shift_variants (voxels per patch axis, zero padding)",
        },
        "ensemble": "mean of the softmax probabilities of all networks, each configuration's mapped back to the "
        "original grid (resampled, uncropped: background outside the crop) first; argmax; class "
        "index -> label id",
        "postprocessing": rules,
    }
    if plan.is_region_based:  # one sigmoid output per region (medseg.preprocessing.regions)
        info["output"]["values"] = (
            "logits; sigmoid per channel gives region probabilities, channel r is region "
            "regions[r] (a set of label ids)"
        )
        info["regions"] = [list(r) for r in plan.regions or ()]
        info["regions_class_order"] = list(plan.regions_class_order or ())
        info["sliding_window"]["weighting"] = info["sliding_window"]["weighting"].replace(
            "then softmax", "then sigmoid"
        )
        info["ensemble"] = (
            "mean of the sigmoid probabilities of all networks on the original grid (0 outside the "
            "crop); from 0, for each region r in order, voxels with probability > 0.5 get "
            "regions_class_order[r]"
        )
    return info
