"""Predict segmentations of raw images with an ensemble of trained networks.

A :class:`Predictor` holds ensemble members (:class:`medseg.inference.members.EnsembleMember`, one trained
network each: a fold of a configuration and an architecture). For one raw image it

1. preprocesses the image once per configuration (the training preprocessing, without a label),
2. runs every member of that configuration with the sliding window (Gaussian weighting, mirror TTA) and
   averages their softmax probabilities on the preprocessed grid,
3. maps that average back onto the original grid (resample, uncrop; background probability 1 outside
   the crop) and averages over configurations, weighting each by its number of members - i.e. the
   result is the mean softmax over all members,
4. takes the argmax, maps class indices to the plan's original label ids and applies the postprocessing
   rules.

A cascade configuration (``3d_cascade_fullres``) first needs its previous stage's segmentation: the
predictor of that stage (``previous_stages``, e.g. every trained ``3d_lowres`` fold) segments the image,
its class map (original grid, not postprocessed) is mapped onto the cascade's preprocessed grid and
appended as one-hot channels (:mod:`medseg.preprocessing.previous_stage`) before the cascade networks run.

:func:`medseg.inference.folder.predict_folder` does this for every case of a folder.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from medseg.errors import MedsegError
from medseg.inference.members import EnsembleMember, load_member, previous_stage_runs, select_work_dir_runs
from medseg.inference.sliding_window import predict_sliding_window, tta_variants
from medseg.inference.time_budget import CaseSetting, NetworkJob, pass_options, reduction_order
from medseg.io.image import ImageGeometry
from medseg.machine import cpu_has_fast_bf16
from medseg.postprocessing.operations import apply_postprocessing, load_rules
from medseg.preprocessing.previous_stage import append_previous_stage, to_preprocessed_grid

logger = logging.getLogger(__name__)

#: Architectures whose CPU inference measured faster channels-last (unet 3D at the hippocampus plan: ~12 %
#: less CPU time; deeplab 2D/3D 5-12 %); psp and fcn measured slower (scripts/bench_predict.py --variants).
CHANNELS_LAST_ARCHS = frozenset({"unet", "deeplab"})


@dataclass
class _Prepared:
    """A case preprocessed for every configuration of the ensemble."""

    case_id: str
    geometry: ImageGeometry
    per_config: dict[str, tuple[np.ndarray, Any]]  # config -> (data (C,z,y,x), CaseProperties)
    previous: dict[str, _Prepared] = field(default_factory=dict)  # previous stage -> its preparation


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
        tta_passes: network passes per window position TTA may spend at most (None = the full TTA; fewer
            mirror fewer axes, 1 = none; see :func:`~medseg.inference.sliding_window.tta_variants`). A
            time-budgeted final validation lowers it per case.
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
        previous_stages: for cascade members (a configuration with ``previous_stage``), the predictor of
            each previous stage, by configuration name (e.g. ``{"3d_lowres": Predictor(...)}``); needed to
            predict raw images, not for :meth:`predict_preprocessed` (whose input holds the channels).

    Raises:
        MedsegError: no members, or members that disagree on label ids / channels.
    """

    def __init__(
        self,
        members: Sequence[EnsembleMember],
        *,
        device: str | torch.device = "cpu",
        use_tta: bool = True,
        tta_passes: int | None = None,
        step: float = 0.5,
        precision: str | None = None,
        batch_size: int | None = None,
        postprocessing: dict[str, Any] | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
        progress: bool = False,
        previous_stages: dict[str, Predictor] | None = None,
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
        self.previous_stages = dict(previous_stages or {})
        self.device = torch.device(device)
        self.use_tta = use_tta
        self.tta_passes = tta_passes
        self.step = step
        self.precision = precision
        self.batch_size = batch_size
        self.postprocessing = postprocessing
        self.progress = progress
        self._lock = threading.Lock()
        self._window_seconds: dict[str, float] = {}
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
        ``postprocessing`` is True and it was fitted on exactly the chosen configurations/architectures;
        otherwise the rules the runs decided from their training labels' component statistics
        (``RUN/postprocessing_prior.json``, :mod:`medseg.postprocessing.prior`).
        A cascade configuration brings the predictor of its previous stage (every trained fold of it).

        Raises:
            MedsegError: no plan, nothing trained, or a requested run has no checkpoint.
        """
        run_dirs, rules = select_work_dir_runs(work_dir, configs, archs, folds, checkpoint, postprocessing)
        previous = {prev: cls.from_run_dirs(dirs, checkpoint=checkpoint, device=device, **kwargs)
                    for prev, dirs in previous_stage_runs(work_dir, run_dirs, checkpoint).items()}
        return cls.from_run_dirs(run_dirs, checkpoint=checkpoint, device=device, postprocessing=rules,
                                 previous_stages=previous, **kwargs)

    @classmethod
    def from_bundle(cls, path: str | Path, configs: Sequence[str] | None = None, archs: Sequence[str] | None = None,
                    folds: Sequence[int | str] | None = None, device: str = "cpu", postprocessing: bool = True,
                    **kwargs: Any) -> Predictor:
        """The ensemble of a model bundle written by ``medseg export`` (see :mod:`medseg.inference.bundle`);
        the same labels as :meth:`from_work_dir` on the work folder it was exported from.

        Raises:
            BundleError: the bundle is missing, truncated, corrupt, incomplete or of a newer format.
        """
        from medseg.inference.bundle import load_bundle

        members, rules = load_bundle(path, configs, archs, folds, postprocessing)
        return cls(members, device=device, postprocessing=rules, **kwargs)

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

    # ------------------------------------------------------------------ time budget
    def _stages(self) -> list[Predictor]:
        """This predictor and those of its previous stages (recursively), each once."""
        out: list[Predictor] = [self]
        for stage in self.previous_stages.values():
            out += [s for s in stage._stages() if all(s is not o for o in out)]
        return out

    @staticmethod
    def _timing_key(member: EnsembleMember) -> str:
        return f"{member.configuration}/{member.arch}"  # folds of one network run equally fast

    def _pass_options(self, member: EnsembleMember) -> list[int]:
        """TTA passes ``member`` can run here, most first (its full TTA within :attr:`tta_passes`, down to 1)."""
        cfg_plan = member.plan.configuration(member.configuration)
        options = pass_options(cfg_plan.resolved_mirror_axes(), cfg_plan.network(member.arch).total_stride(),
                               self.use_tta)
        return sorted({min(p, self.tta_passes) if self.tta_passes else p for p in options}, reverse=True)

    def budget_options(self) -> list[CaseSetting]:
        """The settings a per-case time budget tries, fullest first
        (:func:`~medseg.inference.time_budget.reduction_order`): TTA passes of every member (and previous
        stage) down to 1, then less window overlap than :attr:`step`."""
        passes = {p for stage in self._stages() for m in stage.members for p in stage._pass_options(m)}
        return reduction_order(sorted(passes, reverse=True), self.step)

    def case_jobs(self, prepared: _Prepared) -> list[NetworkJob]:
        """The networks that predict a preprocessed case and what each covers (one per member, previous
        stages included)."""
        jobs = []
        for c, (data, _) in prepared.per_config.items():
            for m in self.members:
                if m.configuration != c:
                    continue
                cfg_plan = m.plan.configuration(c)
                net = cfg_plan.network(m.arch)
                jobs.append(NetworkJob(self._timing_key(m), tuple(int(s) for s in data.shape[1:]),
                                       tuple(net.patch_size), cfg_plan.resolved_mirror_axes(),
                                       tuple(net.total_stride()), self._pass_options(m)[0]))
        for prev, stage in self.previous_stages.items():
            if prev in prepared.previous:
                jobs += stage.case_jobs(prepared.previous[prev])
        return jobs

    def seconds_per_window(self, keys: set[str] | Sequence[str]) -> dict[str, float]:
        """Seconds per sliding-window position of each network (timing key of :meth:`case_jobs`), measured
        once per network: one warm-up and one timed batch of windows through the sliding window (no TTA)."""
        measured: dict[str, float] = {}
        for stage in self._stages():
            for i, m in enumerate(stage.members):
                key = self._timing_key(m)
                if key in keys and key not in stage._window_seconds:
                    stage._window_seconds[key] = stage._measure_window(i)
            measured.update((k, v) for k, v in stage._window_seconds.items() if k in keys)
        missing = sorted(k for k in keys if k not in measured)
        if missing:
            raise MedsegError(f"no ensemble member is the network {missing[0]!r}")
        return measured

    def _measure_window(self, index: int) -> float:
        member = self.members[index]
        net = member.plan.configuration(member.configuration).network(member.arch)
        batch = self.batch_size or inference_batch_size(net.patch_size, net.spec.base_features, self.num_classes,
                                                        self.device)
        patch = tuple(int(p) for p in net.patch_size)
        # `batch` windows side by side at step 1: one network batch (2D: `batch` slices)
        shape = (batch, *patch) if len(patch) == 2 else (*patch[:-1], patch[-1] * batch)
        generator = torch.Generator().manual_seed(0)
        data = torch.randn((self.plan.network_in_channels(member.configuration), *shape), generator=generator)
        seconds = []
        for _ in range(2):  # the first forward of a network and shape is slower (kernels chosen, memory mapped)
            start = time.perf_counter()
            self._member_probabilities(index, data, setting=CaseSetting(1, 1.0)).cpu()
            seconds.append(time.perf_counter() - start)
        logger.debug("%s: %.3f s per window (first batch %.3f s)", self._timing_key(member), seconds[1] / batch,
                     seconds[0])
        return seconds[1] / batch

    # ------------------------------------------------------------------ core
    def _member_probabilities(self, index: int, data: torch.Tensor, should_stop: Callable[[], bool] | None = None,
                              setting: CaseSetting | None = None) -> torch.Tensor:
        member = self.members[index]
        cfg_plan = member.plan.configuration(member.configuration)
        net = cfg_plan.network(member.arch)
        batch = self.batch_size or inference_batch_size(net.patch_size, net.spec.base_features, self.num_classes,
                                                        self.device)
        precision = self.precision or _auto_precision(net.precision, self.device)
        passes = self.tta_passes if setting is None else min(setting.passes, self._pass_options(member)[0])
        with self._lock:  # one network at a time: they share the CPU cores / GPU
            mirror_axes, shifts = tta_variants(cfg_plan.resolved_mirror_axes(), net.total_stride(),
                                               passes=passes) if self.use_tta else (None, None)
            return predict_sliding_window(
                self._runners[index], data, net.patch_size, self.num_classes,
                step=self.step if setting is None else setting.step, mirror_axes=mirror_axes, shifts=shifts,
                device=self.device, precision=precision, batch_size=batch,
                channels_last=self._channels_last[index], progress=self.progress, should_stop=should_stop,
                activation="sigmoid" if member.plan.is_region_based else "softmax",
            )

    def predict_preprocessed(self, data: np.ndarray | torch.Tensor, configuration: str | None = None,
                             should_stop: Callable[[], bool] | None = None,
                             setting: CaseSetting | None = None) -> np.ndarray:
        """Mean softmax of the members of one configuration on an already preprocessed image.

        Args:
            data: preprocessed image, float32 ``(C, z, y, x)``; for a cascade the one-hot previous-stage
                channels follow the image channels (``plan.network_in_channels(configuration)`` in all).
            configuration: which members to use; None requires all members to share one configuration.
            should_stop: checked before every network batch; True abandons the prediction with
                :class:`~medseg.inference.sliding_window.PredictionStopped`.
            setting: TTA passes and window step for this call (a per-case time budget,
                :mod:`medseg.inference.time_budget`); None = the predictor's own.

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
        channels = self.plan.network_in_channels(configuration)
        if x.ndim != 4 or x.shape[0] != channels:
            raise MedsegError(f"expected preprocessed data (C={channels}, z, y, x), got {list(x.shape)}")
        total: torch.Tensor | None = None
        for m in members:
            probs = self._member_probabilities(m, x, should_stop, setting)
            total = probs if total is None else total.add_(probs)
        assert total is not None
        if len(members) > 1:
            total /= len(members)
        return total.cpu().numpy()

    def preprocess(self, image: np.ndarray, geometry: ImageGeometry, case_id: str = "") -> _Prepared:
        """Preprocess a raw image ``(C, Z, Y, X)`` for every configuration of the ensemble (and of the
        previous stages of its cascades)."""
        from medseg.preprocessing import preprocess_case

        per_config = {}
        for c in self.configurations:
            data, _, props = preprocess_case(image, geometry, None, self.plan, c, case_id)
            per_config[c] = (data, props)
        needed = {self.plan.configuration(c).previous_stage for c in self.configurations} - {None}
        missing = sorted(p for p in needed if p not in self.previous_stages)
        if missing:
            raise MedsegError(f"the ensemble holds a cascade that refines the {missing[0]} segmentation, but no "
                              f"{missing[0]} predictor was given (train it: `medseg train WORK --config "
                              f"{missing[0]} --fold N`; predict from the work folder)")
        previous = {p: self.previous_stages[p].preprocess(image, geometry, case_id) for p in sorted(needed)}
        return _Prepared(case_id=case_id, geometry=geometry, per_config=per_config, previous=previous)

    def _infer(self, prepared: _Prepared, setting: CaseSetting | None = None) -> list[tuple[np.ndarray, Any, int]]:
        out = []
        for c, (data, props) in prepared.per_config.items():
            prev = self.plan.configuration(c).previous_stage
            if prev is not None:  # the previous stage's segmentation, on this grid, as one-hot channels
                stage = self.previous_stages[prev]
                classes = stage._combine_labels(stage._infer(prepared.previous[prev], setting))
                data = append_previous_stage(data, to_preprocessed_grid(classes, props), self.plan)
            n = sum(m.configuration == c for m in self.members)
            out.append((self.predict_preprocessed(data, c, setting=setting), props, n))
        return out

    def _combine(self, inferred: list[tuple[np.ndarray, Any, int]]) -> np.ndarray:
        from medseg.preprocessing import revert_to_original

        total: np.ndarray | None = None
        count = 0
        for probs, props, n in inferred:
            orig = revert_to_original(probs, props, background_outside=not self.plan.is_region_based)
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

        if self.plan.is_region_based:  # thresholds need the mean of every region: no one-class-at-a-time argmax
            return self.probabilities_to_classes(self._combine(inferred))
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
        """Argmax over ``(K, Z, Y, X)`` probabilities (region plans: ``regions_class_order`` over the
        ``(R, Z, Y, X)`` sigmoid probabilities) -> original label ids ``(Z, Y, X)``, postprocessed."""
        return self.indices_to_labels(self.probabilities_to_classes(probabilities), postprocess)

    def probabilities_to_classes(self, probabilities: np.ndarray) -> np.ndarray:
        """Class indices ``(Z, Y, X)`` of the probabilities (see :func:`~medseg.preprocessing.regions.probabilities_to_classes`)."""
        from medseg.preprocessing.regions import probabilities_to_classes

        return probabilities_to_classes(probabilities, self.plan)

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




#: Forward-pass memory one CPU inference batch may take (activations + logits, see inference_batch_size).
CPU_INFERENCE_BATCH_BYTES = 2**30


def inference_batch_size(patch_size: Sequence[int], base_features: int, num_classes: int,
                         device: torch.device) -> int:
    """Patches per forward pass: on a GPU 2 (3D) / 8 (2D); on a CPU as many of 4 (3D) / 8 (2D) as fit
    :data:`CPU_INFERENCE_BATCH_BYTES`, at least 1.

    A forward pass holds about ``patch voxels x 4 B x (classes + 6 x base features)`` per patch (measured:
    1.22 GB for a 32-feature 128x112x96 UNet with 46 classes, fp32). Larger batches are faster on a CPU
    (16f 64x48x96: 15.3 s at 4, 20.0 s at 2, 30.4 s at 1 per volume), until they cost memory that a
    many-class scan needs for its probabilities.
    """
    dims = len(patch_size)
    cap = 8 if dims == 2 else (2 if device.type == "cuda" else 4)
    if device.type != "cpu":
        return cap
    per_patch = float(np.prod(patch_size)) * 4.0 * (num_classes + 6 * base_features)
    return max(1, min(cap, int(CPU_INFERENCE_BATCH_BYTES // per_patch)))


def _auto_precision(planned: str, device: torch.device) -> str:
    """The plan's precision, except reduced precision on a CPU without native bf16 (emulated: far slower)."""
    if device.type == "cpu" and planned != "fp32" and not cpu_has_fast_bf16():
        return "fp32"
    return planned
