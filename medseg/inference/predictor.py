"""Predict segmentations of raw images with an ensemble of trained networks.

A :class:`Predictor` holds ensemble members (one trained network each: a fold of a configuration and an
architecture). For one raw image it

1. preprocesses the image once per configuration (the training preprocessing, without a label),
2. runs every member of that configuration with the sliding window (Gaussian weighting, mirror TTA) and
   averages their softmax probabilities on the preprocessed grid,
3. maps that average back onto the original grid (resample, uncrop; background probability 1 outside
   the crop) and averages over configurations, weighting each by its number of members - i.e. the
   result is the mean softmax over all members,
4. takes the argmax, maps class indices to the plan's original label ids, applies the postprocessing
   rules and writes the result with exactly the input's origin, spacing and direction.

:func:`predict_folder` does this for every case of a folder, with reading/preprocessing of the next
case and writing of the previous one overlapping the network compute.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from medseg.errors import CheckpointError, DatasetError, MedsegError
from medseg.inference.export import write_probabilities, write_segmentation
from medseg.inference.sliding_window import predict_sliding_window, tta_variants
from medseg.io.image import ImageGeometry, read_channels
from medseg.planning.plan import Plan
from medseg.postprocessing.operations import apply_postprocessing, load_rules

logger = logging.getLogger(__name__)

CHECKPOINT_NAMES = ("final", "best", "latest")

#: Architectures whose CPU inference measured faster channels-last (unet 3D at the hippocampus plan: ~12 %
#: less CPU time; deeplab 2D/3D 5-12 %); psp and fcn measured slower (scripts/bench_predict.py --variants).
CHANNELS_LAST_ARCHS = frozenset({"unet", "deeplab"})


@dataclass
class EnsembleMember:
    """One trained network of an ensemble.

    Attributes:
        model: the network; ``forward((B, C, *patch)) -> logits (B, K, *patch)`` in eval mode.
        plan: the plan it was trained with (its ``label_ids`` and preprocessing are used).
        configuration: configuration name (selects the preprocessing and the patch size).
        arch: architecture name.
        source: where it came from (checkpoint path), for messages.
    """

    model: torch.nn.Module
    plan: Plan
    configuration: str
    arch: str
    source: str = ""


@dataclass
class _Prepared:
    """A case preprocessed for every configuration of the ensemble."""

    case_id: str
    geometry: ImageGeometry
    per_config: dict[str, tuple[np.ndarray, Any]]  # config -> (data (C,z,y,x), CaseProperties)


def _strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


class _CompiledOrEager(torch.nn.Module):
    """``torch.compile``'d forward that falls back to the eager module (with a warning) if compiling fails,
    e.g. on a machine without a C++ compiler."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.compiled: Any = torch.compile(model, dynamic=False)
        self.failed = False

    def forward(self, x: torch.Tensor) -> Any:
        if not self.failed:
            try:
                return self.compiled(x)
            except Exception as exc:  # noqa: BLE001 - any compiler problem: run eagerly instead
                self.failed = True
                logger.warning("torch.compile failed (%s: %s); running the network eagerly",
                               type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        return self.model(x)


def load_member(run_dir: str | Path, checkpoint: str = "final") -> EnsembleMember:
    """Rebuild one trained network from its run folder (the folder alone is enough).

    Args:
        run_dir: ``WORK/runs/<config>/<arch>/fold_<k>``.
        checkpoint: ``final``, ``best`` or ``latest``.

    Returns:
        The member, model on the CPU in eval mode.

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, or its weights do not fit the network
            the recorded plan describes.
    """
    from medseg.networks import build_network
    from medseg.training.checkpoint import load_checkpoint

    if checkpoint not in CHECKPOINT_NAMES:
        raise CheckpointError(f"checkpoint must be one of {list(CHECKPOINT_NAMES)}, got {checkpoint!r}")
    run_dir = Path(run_dir)
    path = run_dir / f"checkpoint_{checkpoint}.pt"
    if not path.is_file():
        present = sorted(p.name for p in run_dir.glob("checkpoint_*.pt")) if run_dir.is_dir() else []
        hint = f"; present: {present}" if present else ""
        raise CheckpointError(f"{path}: checkpoint not found{hint}")
    ckpt = load_checkpoint(path)
    try:
        plan = Plan.from_dict(ckpt["plan"])
        configuration = str(ckpt["configuration"])
        arch = str(ckpt["arch"])
        state = ckpt["model"]
    except KeyError as exc:
        raise CheckpointError(f"{path}: checkpoint lacks the key {exc}; not a medseg checkpoint") from None
    except MedsegError as exc:
        raise CheckpointError(f"{path}: the plan stored in the checkpoint is invalid: {exc}") from None
    net = plan.configuration(configuration).network(arch)
    model = build_network(net, plan.num_channels, plan.num_classes)
    try:
        model.load_state_dict(_strip_prefixes(state))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the {arch} network of its plan ({first})") from None
    model.eval()
    return EnsembleMember(model=model, plan=plan, configuration=configuration, arch=arch, source=str(path))


class Predictor:
    """Ensemble inference from raw images to label maps in the original geometry.

    Args:
        members: trained networks; all must share label ids and input channels. Their models are put in
            eval mode and moved to ``device``.
        device: ``cpu`` or ``cuda``.
        use_tta: test-time augmentation: mirroring over the patch axes each member was trained mirrored
            (``ConfigurationPlan.mirror_axes`` of the plan stored in its checkpoint; every axis by default),
            and shifts of the patch grid where the plan mirrors fewer axes
            (:func:`medseg.inference.sliding_window.tta_variants`).
        step: sliding-window step as a fraction of the patch (0.5 = half overlap).
        precision: autocast precision (``fp32``, ``bf16``, ``fp16``); None uses each network plan's
            training precision, except on a CPU without native bf16 support (no AVX512-BF16/AMX), where
            emulated bf16 is many times slower than fp32 and fp32 is used.
        batch_size: network inputs (patches, or mirrored copies of one with TTA) per forward pass;
            None = 2 for 3D networks (measured ~10 % less CPU time per patch than 1 or 4 on the CPU) and 8
            slices for 2D networks.
        postprocessing: rules dict (see :mod:`medseg.postprocessing`) or None for none.
        channels_last: run convolutions channels-last (models are converted). None: on the CPU for the
            architectures where it measured faster (:data:`CHANNELS_LAST_ARCHS`), else off.
        compile: run the networks through ``torch.compile`` (compiles once per network and input shape,
            typically 20-60 s on a CPU, then faster forward passes; falls back to eager on failure).
        progress: per-case tqdm bar over the patches.

    Raises:
        MedsegError: no members, or members that disagree on label ids / channels.
    """

    def __init__(
        self,
        members: Sequence[EnsembleMember],
        *,
        device: str | torch.device = "cpu",
        use_tta: bool = True,
        step: float = 0.5,
        precision: str | None = None,
        batch_size: int | None = None,
        postprocessing: dict[str, Any] | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
        progress: bool = False,
    ) -> None:
        if not members:
            raise MedsegError("the predictor needs at least one trained network")
        if not 0 < step <= 1:
            raise MedsegError(f"step must be in (0, 1], got {step}")
        self.members = list(members)
        self.plan = self.members[0].plan
        for m in self.members[1:]:
            if tuple(m.plan.label_ids) != tuple(self.plan.label_ids) or m.plan.num_channels != self.plan.num_channels:
                raise MedsegError(
                    f"ensemble members disagree: {m.source or m.arch} has labels {list(m.plan.label_ids)} and "
                    f"{m.plan.num_channels} channel(s), {self.members[0].source or self.members[0].arch} has "
                    f"{list(self.plan.label_ids)} and {self.plan.num_channels}"
                )
        self.device = torch.device(device)
        self.use_tta = use_tta
        self.step = step
        self.precision = precision
        self.batch_size = batch_size
        self.postprocessing = postprocessing
        self.progress = progress
        self._lock = threading.Lock()
        self._runners: list[torch.nn.Module] = []
        self._channels_last: list[bool] = []
        for m in self.members:
            m.model.eval()
            m.model.to(self.device)
            cl = channels_last if channels_last is not None else (
                self.device.type == "cpu" and m.arch in CHANNELS_LAST_ARCHS)
            if cl:
                dims = len(m.plan.configuration(m.configuration).network(m.arch).patch_size)
                m.model.to(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
            self._channels_last.append(cl)
            self._runners.append(_CompiledOrEager(m.model) if compile else m.model)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_run_dirs(cls, run_dirs: Sequence[str | Path], checkpoint: str = "final", device: str = "cpu",
                      postprocessing: dict[str, Any] | str | Path | None = None, **kwargs: Any) -> Predictor:
        """Ensemble of the given run folders (``WORK/runs/<config>/<arch>/fold_<k>``).

        ``postprocessing`` may be a rules dict or a path to a ``postprocessing.json``; other keyword
        arguments go to :class:`Predictor`.
        """
        if not run_dirs:
            raise MedsegError("no run folders given")
        members = [load_member(d, checkpoint) for d in run_dirs]
        if isinstance(postprocessing, (str, Path)):
            postprocessing = load_rules(postprocessing)
        return cls(members, device=device, postprocessing=postprocessing, **kwargs)

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, checkpoint: str = "final", device: str = "cpu",
                     **kwargs: Any) -> Predictor:
        """A single trained run as a predictor (see :meth:`from_run_dirs`)."""
        return cls.from_run_dirs([run_dir], checkpoint=checkpoint, device=device, **kwargs)

    @classmethod
    def from_work_dir(
        cls,
        work_dir: str | Path,
        configs: Sequence[str] | None = None,
        archs: Sequence[str] | None = None,
        folds: Sequence[int | str] | None = None,
        checkpoint: str = "final",
        device: str = "cpu",
        postprocessing: bool = True,
        **kwargs: Any,
    ) -> Predictor:
        """The ensemble to use for a work folder.

        Defaults (no ``configs``/``archs``): the configurations/architectures and folds ``medseg find-best``
        recorded in ``WORK/best.json``; without it, every trained fold of the plan's default configuration
        and architecture (``fold_all`` only when no numbered fold is trained). Given ``configs``/``archs``,
        every planned (configuration, architecture) pair. ``folds`` selects folds (``"all"`` = the
        ``fold_all`` run). ``WORK/postprocessing.json`` is applied when
        ``postprocessing`` is True and it was fitted on exactly the chosen configurations/architectures.

        Raises:
            MedsegError: no plan, nothing trained, or a requested run has no checkpoint.
        """
        from medseg.ensembling.runs import find_trained_runs

        work_dir = Path(work_dir)
        plan = Plan.load(work_dir / "plans.json")
        best = _read_best(work_dir)
        if best is not None and configs is None and archs is None:
            pairs = [(m["configuration"], m["arch"]) for m in best["members"]]
            folds = folds if folds is not None else best.get("folds")
            logger.info("using the ensemble find-best chose: %s", ", ".join(f"{c}/{a}" for c, a in pairs))
        else:
            pairs = []
            for c in configs or [plan.default_configuration]:
                cfg = plan.configuration(c)
                for a in archs or [cfg.default_arch]:
                    cfg.network(a)  # clear error when the architecture is not planned
                    pairs.append((c, a))
        run_dirs: list[Path] = []
        for c, a in pairs:
            trained = find_trained_runs(work_dir, c, a, checkpoint)
            if folds is not None:
                wanted = [f"fold_{f}" for f in folds]
                missing = [w for w in wanted if w not in trained]
                if missing:
                    raise MedsegError(
                        f"{work_dir / 'runs' / c / a}: no checkpoint_{checkpoint}.pt for {', '.join(missing)}"
                        f" (trained: {sorted(trained) or 'none'}); train it with `medseg train {work_dir} "
                        f"--config {c} --arch {a} --fold N`"
                    )
                chosen = [trained[w] for w in wanted]
            else:
                chosen = [d for name, d in sorted(trained.items()) if name != "fold_all"] or (
                    [trained["fold_all"]] if "fold_all" in trained else [])
            if not chosen:
                raise MedsegError(
                    f"{work_dir / 'runs' / c / a}: no trained model (no fold_*/checkpoint_{checkpoint}.pt); "
                    f"train one with `medseg train {work_dir} --config {c} --arch {a} --fold 0`"
                )
            run_dirs.extend(chosen)
        rules = None
        pp_path = work_dir / "postprocessing.json"
        if postprocessing and pp_path.is_file():
            candidate = load_rules(pp_path)
            fitted = {tuple(m) for m in candidate.get("fitted_on", {}).get("members", [])}
            if fitted == set(pairs):
                rules = candidate
            else:
                logger.info("%s was fitted on %s, not on the chosen ensemble; not applied", pp_path,
                            sorted(fitted) or "an unknown ensemble")
        logger.info("ensemble of %d network(s): %s", len(run_dirs), ", ".join(
            str(d.relative_to(work_dir / "runs")) for d in run_dirs))
        return cls.from_run_dirs(run_dirs, checkpoint=checkpoint, device=device, postprocessing=rules, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def label_ids(self) -> tuple[int, ...]:
        return tuple(self.plan.label_ids)

    @property
    def num_classes(self) -> int:
        return self.plan.num_classes

    @property
    def configurations(self) -> list[str]:
        """Configurations of the members, in order of first appearance."""
        seen: list[str] = []
        for m in self.members:
            if m.configuration not in seen:
                seen.append(m.configuration)
        return seen

    def describe(self) -> str:
        """e.g. ``"5 x 3d_fullres/unet"``."""
        counts: dict[str, int] = {}
        for m in self.members:
            key = f"{m.configuration}/{m.arch}"
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{n} x {k}" for k, n in counts.items())

    # ------------------------------------------------------------------ core
    def _member_probabilities(self, index: int, data: torch.Tensor) -> torch.Tensor:
        member = self.members[index]
        cfg_plan = member.plan.configuration(member.configuration)
        net = cfg_plan.network(member.arch)
        dims = len(net.patch_size)
        batch = self.batch_size or (2 if dims == 3 else 8)
        precision = self.precision or _auto_precision(net.precision, self.device)
        with self._lock:  # one network at a time: they share the CPU cores / GPU
            mirror_axes, shifts = tta_variants(cfg_plan.resolved_mirror_axes(), net.total_stride()) if self.use_tta \
                else (None, None)
            return predict_sliding_window(
                self._runners[index], data, net.patch_size, self.num_classes,
                step=self.step, mirror_axes=mirror_axes, shifts=shifts,
                device=self.device, precision=precision, batch_size=batch,
                channels_last=self._channels_last[index], progress=self.progress,
            )

    def predict_preprocessed(self, data: np.ndarray | torch.Tensor, configuration: str | None = None) -> np.ndarray:
        """Mean softmax of the members of one configuration on an already preprocessed image.

        Args:
            data: preprocessed image, float32 ``(C, z, y, x)``.
            configuration: which members to use; None requires all members to share one configuration.

        Returns:
            float32 probabilities ``(K, z, y, x)`` (numpy, CPU), same grid as ``data``.
        """
        configs = self.configurations
        if configuration is None:
            if len(configs) > 1:
                raise MedsegError(
                    f"the ensemble mixes configurations {configs}; name the one `data` is preprocessed for")
            configuration = configs[0]
        members = [i for i, m in enumerate(self.members) if m.configuration == configuration]
        if not members:
            raise MedsegError(f"no ensemble member uses configuration {configuration!r} (have {configs})")
        x = torch.as_tensor(np.asarray(data, dtype=np.float32) if not isinstance(data, torch.Tensor) else data)
        if x.ndim != 4 or x.shape[0] != self.plan.num_channels:
            raise MedsegError(f"expected preprocessed data (C={self.plan.num_channels}, z, y, x), got {list(x.shape)}")
        total: torch.Tensor | None = None
        for m in members:
            probs = self._member_probabilities(m, x)
            total = probs if total is None else total.add_(probs)
        assert total is not None
        if len(members) > 1:
            total /= len(members)
        return total.cpu().numpy()

    def preprocess(self, image: np.ndarray, geometry: ImageGeometry, case_id: str = "") -> _Prepared:
        """Preprocess a raw image ``(C, Z, Y, X)`` for every configuration of the ensemble."""
        from medseg.preprocessing import preprocess_case

        per_config = {}
        for c in self.configurations:
            data, _, props = preprocess_case(image, geometry, None, self.plan, c, case_id)
            per_config[c] = (data, props)
        return _Prepared(case_id=case_id, geometry=geometry, per_config=per_config)

    def _infer(self, prepared: _Prepared) -> list[tuple[np.ndarray, Any, int]]:
        out = []
        for c, (data, props) in prepared.per_config.items():
            n = sum(m.configuration == c for m in self.members)
            out.append((self.predict_preprocessed(data, c), props, n))
        return out

    def _combine(self, inferred: list[tuple[np.ndarray, Any, int]]) -> np.ndarray:
        from medseg.preprocessing import revert_to_original

        total: np.ndarray | None = None
        count = 0
        for probs, props, n in inferred:
            orig = revert_to_original(probs, props)
            if total is None:
                total = orig * n if n != 1 else orig
            else:
                total += orig * n
            count += n
        assert total is not None
        if count != 1:
            total /= count
        return total

    def _combine_labels(self, inferred: list[tuple[np.ndarray, Any, int]]) -> np.ndarray:
        """Argmax of the mean probabilities on the original grid, one class at a time.

        Equal to ``_combine(inferred).argmax(0)`` but holds ~3 original-grid volumes instead of ``K``
        (matters for many classes on large scans). Returns ``(Z, Y, X)`` class indices.
        """
        from medseg.preprocessing import revert_to_original

        best: np.ndarray | None = None
        arg: np.ndarray | None = None
        for k in range(self.num_classes):
            acc: np.ndarray | None = None
            for probs, props, n in inferred:
                p = revert_to_original(probs[k:k + 1], props)[0]  # a new array
                if k > 0:  # revert pads a single channel as if it were background
                    _zero_outside(p, props.bbox)
                if n != 1:
                    p *= n
                acc = p if acc is None else np.add(acc, p, out=acc)
            assert acc is not None
            if best is None:
                best = acc
                arg = np.zeros(acc.shape, dtype=np.uint8 if self.num_classes <= 256 else np.int32)
            else:
                better = acc > best
                arg[better] = k
                np.maximum(best, acc, out=best)
        assert arg is not None
        return arg

    def predict_labels(self, image: np.ndarray, geometry: ImageGeometry, case_id: str = "",
                       postprocess: bool = True) -> np.ndarray:
        """Segment a raw image ``(C, Z, Y, X)``: original label ids ``(Z, Y, X)``, postprocessed."""
        seg = self._combine_labels(self._infer(self.preprocess(image, geometry, case_id)))
        return self.indices_to_labels(seg, postprocess)

    def predict_probabilities(self, image: np.ndarray, geometry: ImageGeometry, case_id: str = "") -> np.ndarray:
        """Mean softmax over all members, on the original grid.

        Args:
            image: raw intensities ``(C, Z, Y, X)`` as read from the files.
            geometry: its geometry.
            case_id: name used in messages.

        Returns:
            float32 probabilities ``(K, Z, Y, X)``.
        """
        return self._combine(self._infer(self.preprocess(image, geometry, case_id)))

    def probabilities_to_labels(self, probabilities: np.ndarray, postprocess: bool = True) -> np.ndarray:
        """Argmax over ``(K, Z, Y, X)`` probabilities -> original label ids ``(Z, Y, X)``, postprocessed."""
        return self.indices_to_labels(probabilities.argmax(0), postprocess)

    def indices_to_labels(self, seg: np.ndarray, postprocess: bool = True) -> np.ndarray:
        """Class indices ``(Z, Y, X)`` -> original label ids (uint8/uint16), postprocessing applied."""
        from medseg.preprocessing import classes_to_labels

        out = classes_to_labels(seg, self.label_ids)
        if postprocess and self.postprocessing:
            out = apply_postprocessing(out, self.postprocessing)
        return out

    def predict_array(self, image: np.ndarray, spacing_or_geometry: ImageGeometry | Sequence[float]) -> np.ndarray:
        """Segment an in-memory image.

        Args:
            image: raw intensities, ``(C, Z, Y, X)``, or ``(Z, Y, X)`` for a single channel.
            spacing_or_geometry: voxel spacing in mm ``(Z, Y, X)`` or a full :class:`ImageGeometry`.

        Returns:
            Original label ids ``(Z, Y, X)`` (uint8 / uint16), postprocessed.
        """
        image = np.asarray(image, dtype=np.float32)
        if image.ndim == 3 and self.plan.num_channels == 1:
            image = image[None]
        if image.ndim != 4 or image.shape[0] != self.plan.num_channels:
            raise MedsegError(f"expected an image with {self.plan.num_channels} channel(s), (C, Z, Y, X), "
                              f"got shape {list(image.shape)}")
        if isinstance(spacing_or_geometry, ImageGeometry):
            geometry = spacing_or_geometry
        else:
            spacing = tuple(float(s) for s in spacing_or_geometry)
            if len(spacing) != 3:
                raise MedsegError(f"spacing must have 3 entries (Z, Y, X) in mm, got {list(spacing)}")
            geometry = ImageGeometry(tuple(image.shape[1:]), spacing, (0.0, 0.0, 0.0),
                                     (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        return self.predict_labels(image, geometry)

    def predict_sitk(self, image: sitk.Image | Sequence[sitk.Image]) -> sitk.Image:
        """Segment SimpleITK image(s) (one per channel); the result has the input's exact geometry."""
        images = [image] if isinstance(image, sitk.Image) else list(image)
        if len(images) != self.plan.num_channels:
            raise MedsegError(f"the model expects {self.plan.num_channels} channel image(s), got {len(images)}")
        arrays = [sitk.GetArrayFromImage(im).astype(np.float32) for im in images]
        if any(a.shape != arrays[0].shape for a in arrays):
            raise MedsegError(f"channel images differ in shape: {[list(a.shape) for a in arrays]}")
        geometry = ImageGeometry.from_sitk(images[0])
        seg = self.predict_labels(np.stack(arrays), geometry)
        out = sitk.GetImageFromArray(seg)
        out.CopyInformation(images[0])
        return out


def _zero_outside(array: np.ndarray, bbox: Sequence[tuple[int, int]]) -> None:
    """Set ``array`` to 0 outside the box ``bbox`` ((start, stop) per axis; a leading Z entry is ignored
    for a 2D array), in place."""
    bbox = list(bbox)[-array.ndim:]
    for axis, (start, stop) in enumerate(bbox):
        index: list[Any] = [slice(None)] * array.ndim
        index[axis] = slice(0, start)
        array[tuple(index)] = 0
        index[axis] = slice(stop, None)
        array[tuple(index)] = 0


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bfloat16 convolutions natively (AVX512-BF16 / AMX via oneDNN)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def _auto_precision(planned: str, device: torch.device) -> str:
    """The plan's precision, except reduced precision on a CPU without native bf16 (emulated: far slower)."""
    if device.type == "cpu" and planned != "fp32" and not cpu_has_fast_bf16():
        return "fp32"
    return planned


def _read_best(work_dir: Path) -> dict[str, Any] | None:
    path = work_dir / "best.json"
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text())
        if not best.get("members"):
            raise ValueError("no members")
        return best
    except (ValueError, AttributeError) as exc:
        raise MedsegError(f"{path}: unreadable find-best result ({exc}); re-run `medseg find-best`") from None


# ---------------------------------------------------------------------- folders
@dataclass
class PredictionResult:
    """Outcome of :func:`predict_folder`.

    Attributes:
        output_dir: where segmentations were written.
        written: case ids written.
        skipped: case ids whose output already existed.
        failed: case id -> message.
        warnings: messages worth the user's attention (e.g. unusual spacing).
        seconds: wall time.
    """

    output_dir: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no case failed."""
        return not self.failed

    def summary(self) -> str:
        lines = [f"predicted {len(self.written)} case(s) into {self.output_dir} in {self.seconds:.1f} s"]
        if self.skipped:
            lines[0] += f"; {len(self.skipped)} skipped (output exists; --overwrite to redo)"
        if self.failed:
            lines[0] += f"; {len(self.failed)} FAILED:"
            lines += [f"  {case}: {msg}" for case, msg in self.failed.items()]
        return "\n".join(lines)


def _case_suffix(path: Path) -> str:
    from medseg.io.image import IMAGE_SUFFIXES

    return next((s for s in IMAGE_SUFFIXES if path.name.endswith(s)), ".nii.gz")


def _check_folders(input_dir: Path, output_dir: Path) -> None:
    if not input_dir.is_dir():
        raise MedsegError(f"{input_dir}: input folder not found")
    inp, out = input_dir.resolve(), output_dir.resolve()
    if out == inp or inp in out.parents:
        raise MedsegError(
            f"{output_dir}: the output folder must not be the input folder or inside it ({input_dir}); "
            "medseg never writes next to your input images"
        )


def spacing_warning(case_id: str, spacing: Sequence[float], plan: Plan) -> str | None:
    """A message when ``spacing`` (mm) is > 2x or < 0.5x the plan's median training spacing on any axis."""
    ref = tuple(plan.original_median_spacing)[-len(spacing):]
    ratios = [s / r for s, r in zip(spacing, ref) if r > 0]
    if any(q > 2.0 or q < 0.5 for q in ratios):
        return (f"{case_id}: spacing {[round(float(s), 3) for s in spacing]} mm is far from the training data's "
                f"median {[round(float(r), 3) for r in ref]} mm; the segmentation may be poor")
    return None


_PROBLEM_RE = re.compile(r"^case (?P<case>.+?): ")


def find_cases_tolerant(input_dir: Path, num_channels: int) -> tuple[list[Any], dict[str, str]]:
    """Cases to predict plus the cases that cannot be formed (wrong channel files), without giving up.

    :func:`medseg.io.dataset.find_prediction_cases` refuses the whole folder when one case is malformed;
    here the malformed cases are reported (case id -> message) and every other case is still returned,
    found by the same function on a temporary folder of links to the remaining files.

    Raises:
        MedsegError: the folder is missing or has no images at all.
    """
    from medseg.io.dataset import find_prediction_cases
    from medseg.io.image import has_image_suffix, strip_suffix

    try:
        return find_prediction_cases(input_dir, num_channels), {}
    except DatasetError as exc:
        failed: dict[str, str] = {}
        for problem in exc.problems:
            m = _PROBLEM_RE.match(problem)
            if m is None:
                raise
            failed.setdefault(m.group("case"), problem[m.end():])
    channel_re = re.compile(r"^(?P<case>.+)_\d{4}$")
    with tempfile.TemporaryDirectory(prefix="medseg_cases_") as tmp:
        for f in sorted(input_dir.iterdir()):
            if not f.is_file() or f.name.startswith(".") or not has_image_suffix(f.name):
                continue
            stem = strip_suffix(f.name)
            m = channel_re.match(stem)
            if stem in failed or (m is not None and m.group("case") in failed):
                continue
            os.symlink(f.resolve(), Path(tmp) / f.name)
        try:
            linked = find_prediction_cases(Path(tmp), num_channels) if any(Path(tmp).iterdir()) else []
        except DatasetError:
            linked = []
    cases = [dataclasses.replace(c, image_files=tuple(input_dir / p.name for p in c.image_files)) for c in linked]
    return cases, failed


def predict_folder(
    input_dir: str | Path,
    output_dir: str | Path,
    predictor: Predictor,
    overwrite: bool = False,
    save_probabilities: bool = False,
    num_workers: int = 1,
    progress: bool = True,
) -> PredictionResult:
    """Segment every case of a folder.

    Cases are found with :func:`medseg.io.dataset.find_prediction_cases` (MSD ``CASE.nii.gz`` or nnU-Net
    ``CASE_0000.nii.gz`` naming). Output files are ``OUT/CASE<ending>`` (original label ids, the input's
    geometry, NIfTI header copied from the input); with ``save_probabilities`` also ``OUT/CASE.npz``
    holding ``probabilities`` float16 ``(K, Z, Y, X)`` on the original grid and ``label_ids``. A case that
    fails (missing/extra channel files, unreadable or truncated file, ...) is reported and the others
    are still written.

    Args:
        input_dir: folder of images.
        output_dir: folder for segmentations; must not be ``input_dir`` or inside it. Created if needed.
        predictor: the ensemble.
        overwrite: re-predict cases whose output exists (default: skip them).
        save_probabilities: also write the probabilities.
        num_workers: threads reading/preprocessing upcoming cases and writing finished ones while the
            network runs.
        progress: tqdm bar over the cases.

    Returns:
        :class:`PredictionResult` (``ok`` is False when any case failed).

    Raises:
        MedsegError: missing input folder, output inside input, or no images in the folder.
    """
    from tqdm import tqdm

    from medseg.io.dataset import _nifti_raw_check

    t0 = time.perf_counter()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    _check_folders(input_dir, output_dir)
    plan = predictor.plan
    cases, bad_cases = find_cases_tolerant(input_dir, plan.num_channels)
    if not cases and not bad_cases:
        raise MedsegError(f"{input_dir}: no images found (expected CASE.nii.gz or CASE_0000.nii.gz, ...)")
    output_dir.mkdir(parents=True, exist_ok=True)
    result = PredictionResult(output_dir=output_dir)
    result.failed.update(bad_cases)

    todo = []
    for case in cases:
        target = output_dir / f"{case.case_id}{_case_suffix(case.image_files[0])}"
        if target.exists() and not overwrite:
            result.skipped.append(case.case_id)
        else:
            todo.append((case, target))
    if result.skipped:
        logger.info("%d case(s) already predicted in %s; skipping them (use --overwrite to redo)",
                    len(result.skipped), output_dir)

    def load(case: Any) -> _Prepared:
        files = list(case.image_files)
        if len(files) != plan.num_channels:
            raise MedsegError(
                f"{files[0]}: case has {len(files)} channel file(s), the model expects {plan.num_channels}")
        for f in files:  # SimpleITK reads truncated NIfTI silently (garbage voxels) and NaN as 0
            problem, nonfinite = _nifti_raw_check(Path(f))
            if problem:
                raise MedsegError(f"{f}: unreadable or truncated image file ({problem})")
            if nonfinite and any(nonfinite):
                msg = f"{case.case_id}: {f} holds {nonfinite[0]} NaN and {nonfinite[1]} Inf voxels; they are read as 0"
                logger.warning(msg)
                result.warnings.append(msg)
        image, geometry = read_channels(files)
        if image.ndim not in (3, 4):
            raise MedsegError(f"{files[0]}: expected a 2D or 3D image, got shape {list(image.shape[1:])}")
        warning = spacing_warning(case.case_id, geometry.spacing, plan)
        if warning:
            logger.warning(warning)
            result.warnings.append(warning)
        return predictor.preprocess(image, geometry, case.case_id)

    def finish(case: Any, target: Path, inferred: list) -> None:
        geometry = inferred[0][1].geometry
        if save_probabilities:
            probs = predictor._combine(inferred)
            del inferred[:]
            write_probabilities(output_dir / f"{case.case_id}.npz", probs, predictor.label_ids)
            seg = predictor.probabilities_to_labels(probs)
            del probs
        else:
            seg = predictor.indices_to_labels(predictor._combine_labels(inferred))
        del inferred[:]
        write_segmentation(seg, geometry, target, reference=case.image_files[0])

    workers = max(1, int(num_workers))
    bar = tqdm(total=len(todo), desc="predict", unit="case", disable=not progress or not todo)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medseg-read") as readers, \
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medseg-write") as writers:
        pending_reads: deque[tuple[Any, Path, Future]] = deque()
        pending_writes: deque[tuple[str, Future]] = deque()
        queue = iter(todo)

        def refill() -> None:
            while len(pending_reads) < workers + 1:
                nxt = next(queue, None)
                if nxt is None:
                    return
                pending_reads.append((nxt[0], nxt[1], readers.submit(load, nxt[0])))

        def collect(block: bool) -> None:
            while pending_writes and (block or pending_writes[0][1].done() or len(pending_writes) > workers):
                case_id, fut = pending_writes.popleft()
                try:
                    fut.result()
                    result.written.append(case_id)
                except Exception as exc:  # noqa: BLE001 - one bad case must not stop the others
                    result.failed[case_id] = _message(exc)
                    logger.debug("writing %s failed", case_id, exc_info=True)
                bar.update()

        refill()
        while pending_reads:
            case, target, fut = pending_reads.popleft()
            refill()
            try:
                prepared = fut.result()
                inferred = predictor._infer(prepared)
            except Exception as exc:  # noqa: BLE001
                result.failed[case.case_id] = _message(exc)
                logger.debug("predicting %s failed", case.case_id, exc_info=True)
                bar.update()
                continue
            pending_writes.append((case.case_id, writers.submit(finish, case, target, inferred)))
            collect(block=False)
        collect(block=True)
    bar.close()
    result.seconds = time.perf_counter() - t0
    for case_id, msg in result.failed.items():
        logger.error("%s: %s", case_id, msg)
    return result


def _message(exc: BaseException) -> str:
    if isinstance(exc, MedsegError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
