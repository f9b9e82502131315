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
   it was handed (``postprocess``, a callable on the label map; the rules are chosen above inference,
   :mod:`medseg.ensembling.selection`).

Steps 1 and 3 are :mod:`medseg.inference.case_grid`; the choices per network (compiling, channels-last,
batch size, precision) :mod:`medseg.inference.network_runner`.

A cascade configuration (``3d_cascade_fullres``) first needs its previous stage's segmentation: the
predictor of that stage (``previous_stages``, e.g. every trained ``3d_lowres`` fold) segments the image,
its class map (original grid, not postprocessed) is mapped onto the cascade's preprocessed grid and
appended as one-hot channels (:mod:`medseg.preprocessing.previous_stage`) before the cascade networks run.

:func:`medseg.inference.folder.predict_folder` does this for every case of a folder.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.errors import MedsegError
from medseg.inference.array_input import InMemoryInput
from medseg.inference.case_grid import Inferred, PreparedCase, combine_classes, combine_probabilities
from medseg.inference.ensemble_timing import EnsembleTiming
from medseg.inference.members import EnsembleMember, load_member
from medseg.inference.memory_plan import MemoryPlan, MemoryPlanning, budget_bytes
from medseg.inference.network_runner import auto_precision, inference_batch_size, prepare_network
from medseg.inference.scratch import ScratchSpace, in_slabs
from medseg.inference.sliding_window import predict_sliding_window, tta_variants
from medseg.inference.time_budget import CaseSetting
from medseg.io.image import ImageGeometry
from medseg.preprocessing import classes_to_labels, preprocess_case
from medseg.preprocessing.previous_stage import append_previous_stage, to_preprocessed_grid
from medseg.preprocessing.regions import probabilities_to_classes

logger = logging.getLogger(__name__)

#: What a :class:`Predictor` applies to each ``(Z, Y, X)`` map of original label ids before it is returned or
#: written (e.g. :class:`medseg.postprocessing.operations.RulesPostprocess`), called with the map and the case's
#: voxel spacing (mm, the map's axis order, from the input image's geometry); returns a map of the same shape.
Postprocess = Callable[[np.ndarray, Sequence[float]], np.ndarray]


class Predictor(EnsembleTiming, MemoryPlanning, InMemoryInput):
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
        postprocess: applied to every label map of original label ids (:data:`Postprocess`), or None for
            none; built by the caller from the postprocessing rules
            (:func:`medseg.ensembling.selection.postprocess_of`).
        channels_last: run convolutions channels-last (models are converted). None: on the CPU for the
            architectures where it measured faster
            (:data:`~medseg.inference.network_runner.CHANNELS_LAST_ARCHS`), else off.
        compile: run the networks through ``torch.compile`` (compiles once per network and input shape,
            typically 20-60 s on a CPU, then faster forward passes; falls back to eager on failure).
            Both: :func:`~medseg.inference.network_runner.prepare_network`.
        progress: per-case tqdm bar over the patches.
        previous_stages: for cascade members (a configuration with ``previous_stage``), the predictor of
            each previous stage, by configuration name (e.g. ``{"3d_lowres": Predictor(...)}``); needed to
            predict raw images, not for :meth:`predict_preprocessed` (whose input holds the channels).
        max_ram_gb: RAM one case may take, GB (10^9 bytes); ``"auto"`` = 80 %% of the memory available
            when the predictor is built; None = no limit. A case whose memory plan exceeds it is streamed
            (:mod:`medseg.inference.memory_plan`: accumulators on a memory-mapped file, the same results).
        scratch_dir: where a streamed case's memory-mapped files go (None = the system's temporary folder;
            :func:`~medseg.inference.folder.predict_folder` uses its output folder).

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
        postprocess: Postprocess | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
        progress: bool = False,
        previous_stages: dict[str, Predictor] | None = None,
        max_ram_gb: float | str | None = "auto",
        scratch_dir: str | Path | None = None,
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
        self.postprocess = postprocess
        self.progress = progress
        self.budget_bytes = budget_bytes(max_ram_gb)
        self.scratch_dir = scratch_dir
        self._lock = threading.Lock()
        self._window_seconds: dict[str, float] = {}
        self._runners: list[torch.nn.Module] = []
        self._channels_last: list[bool] = []
        for m in self.members:
            runner, cl = prepare_network(m.model, m.arch, m.stage.dims, self.device, channels_last, compile)
            self._channels_last.append(cl)
            self._runners.append(runner)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_run_dirs(
        cls, run_dirs: Sequence[str | Path], checkpoint: str = "final", device: str = "cpu", **kwargs: Any
    ) -> Predictor:
        """Ensemble of the given run folders (``WORK/runs/<config>/<arch>/fold_<k>``); other keyword
        arguments (``postprocess``, ...) go to :class:`Predictor`."""
        if not run_dirs:
            raise MedsegError("no run folders given")
        members = [load_member(d, checkpoint) for d in run_dirs]
        return cls(members, device=device, **kwargs)

    @classmethod
    def from_run_dir(
        cls, run_dir: str | Path, checkpoint: str = "final", device: str = "cpu", **kwargs: Any
    ) -> Predictor:
        """A single trained run as a predictor (see :meth:`from_run_dirs`)."""
        return cls.from_run_dirs([run_dir], checkpoint=checkpoint, device=device, **kwargs)

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
    def _member_probabilities(
        self,
        index: int,
        data: torch.Tensor,
        should_stop: Callable[[], bool] | None = None,
        setting: CaseSetting | None = None,
        scratch: ScratchSpace | None = None,
    ) -> torch.Tensor:
        member = self.members[index]
        stage = member.stage
        net = stage.network
        batch = self.batch_size or inference_batch_size(
            net.patch_size, net.spec.base_features, self.num_classes, self.device
        )
        precision = self.precision or auto_precision(net.precision, self.device)
        passes = self.tta_passes if setting is None else min(setting.passes, self._pass_options(member)[0])
        with self._lock:  # one network at a time: they share the CPU cores / GPU
            mirror_axes, shifts = (
                tta_variants(stage.mirror_axes, stage.total_stride, passes=passes) if self.use_tta else (None, None)
            )
            return predict_sliding_window(
                self._runners[index],
                data,
                net.patch_size,
                self.num_classes,
                step=self.step if setting is None else setting.step,
                mirror_axes=mirror_axes,
                shifts=shifts,
                device=self.device,
                precision=precision,
                batch_size=batch,
                channels_last=self._channels_last[index],
                progress=self.progress,
                should_stop=should_stop,
                activation="sigmoid" if member.plan.is_region_based else "softmax",
                scratch=scratch,
            )

    def predict_preprocessed(
        self,
        data: np.ndarray | torch.Tensor,
        configuration: str | None = None,
        should_stop: Callable[[], bool] | None = None,
        setting: CaseSetting | None = None,
        scratch: ScratchSpace | None = None,
    ) -> np.ndarray:
        """Mean softmax of the members of one configuration on an already preprocessed image.

        Args:
            data: preprocessed image, float32 ``(C, z, y, x)``; for a cascade the one-hot previous-stage
                channels follow the image channels (``plan.network_in_channels(configuration)`` in all).
            configuration: which members to use; None requires all members to share one configuration.
            should_stop: checked before every network batch; True abandons the prediction with
                :class:`~medseg.inference.sliding_window.PredictionStopped`.
            setting: TTA passes and window step for this call (a per-case time budget,
                :mod:`medseg.inference.time_budget`); None = the predictor's own.
            scratch: keep the probabilities on this disk-backed space (a streamed case); None = in memory.

        Returns:
            probabilities ``(K, z, y, x)`` (numpy, CPU; float16 for a large output, see
            :func:`~medseg.inference.sliding_window.predict_sliding_window`), same grid as ``data``.
        """
        configs = self.configurations
        if configuration is None:
            if len(configs) > 1:
                raise MedsegError(
                    f"the ensemble mixes configurations {configs}; name the one `data` is preprocessed for"
                )
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
            probs = self._member_probabilities(m, x, should_stop, setting, scratch)
            total = probs if total is None else in_slabs(total, scratch, torch.Tensor.add_, probs)
        assert total is not None
        if len(members) > 1:
            total = in_slabs(total, scratch, torch.Tensor.div_, len(members))
        return total.cpu().numpy()

    def preprocess(self, image: np.ndarray, geometry: ImageGeometry, case_id: str = "") -> PreparedCase:
        """Preprocess a raw image ``(C, Z, Y, X)`` for every configuration of the ensemble (and of the
        previous stages of its cascades)."""
        per_config = {}
        for c in self.configurations:
            data, _, props = preprocess_case(image, geometry, None, self.plan, c, case_id)
            per_config[c] = (data, props)
        needed = {p for c in self.configurations if (p := self.plan.configuration(c).previous_stage) is not None}
        missing = sorted(p for p in needed if p not in self.previous_stages)
        if missing:
            raise MedsegError(
                f"the ensemble holds a cascade that refines the {missing[0]} segmentation, but no "
                f"{missing[0]} predictor was given (train it: `medseg train WORK --config "
                f"{missing[0]} --fold N`; predict from the work folder)"
            )
        previous = {p: self.previous_stages[p].preprocess(image, geometry, case_id) for p in sorted(needed)}
        return PreparedCase(case_id=case_id, geometry=geometry, per_config=per_config, previous=previous)

    def _infer(
        self,
        prepared: PreparedCase,
        setting: CaseSetting | None = None,
        memory: MemoryPlan | None = None,
        scratch_dir: str | Path | None = None,
    ) -> Inferred:
        """Every configuration's mean probabilities on its grid; streamed (:mod:`~medseg.inference.scratch`)
        when the case's memory plan (``memory``, else :meth:`memory_plan`) says so."""
        memory = memory or self.memory_plan(prepared, setting)
        scratch = memory.scratch_space(prepared.case_id, scratch_dir or self.scratch_dir)
        out = []
        for c, (data, props) in prepared.per_config.items():
            prev = self.plan.configuration(c).previous_stage
            if prev is not None:  # the previous stage's segmentation, on this grid, as one-hot channels
                stage = self.previous_stages[prev]
                classes = stage._combine_labels(stage._infer(prepared.previous[prev], setting))
                data = append_previous_stage(data, to_preprocessed_grid(classes, props), self.plan)
            n = sum(m.configuration == c for m in self.members)
            out.append((self.predict_preprocessed(data, c, setting=setting, scratch=scratch), props, n))
        return out

    def _combine(self, inferred: Inferred) -> np.ndarray:
        """Mean probabilities over all members on the original grid (:func:`~medseg.inference.case_grid.combine_probabilities`)."""
        return combine_probabilities(inferred, self.plan)

    def _combine_labels(self, inferred: Inferred) -> np.ndarray:
        """Class indices ``(Z, Y, X)`` of the mean probabilities (:func:`~medseg.inference.case_grid.combine_classes`)."""
        return combine_classes(inferred, self.plan)

    def predict_labels(
        self, image: np.ndarray, geometry: ImageGeometry, case_id: str = "", postprocess: bool = True
    ) -> np.ndarray:
        """Segment a raw image ``(C, Z, Y, X)``: original label ids ``(Z, Y, X)``, postprocessed."""
        seg = self._combine_labels(self._infer(self.preprocess(image, geometry, case_id)))
        return self.indices_to_labels(seg, geometry.spacing, postprocess)

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

    def probabilities_to_labels(
        self, probabilities: np.ndarray, spacing: Sequence[float], postprocess: bool = True
    ) -> np.ndarray:
        """Argmax over ``(K, Z, Y, X)`` probabilities (region plans: ``regions_class_order`` over the
        ``(R, Z, Y, X)`` sigmoid probabilities) -> original label ids ``(Z, Y, X)``, postprocessed (with the
        case's voxel ``spacing``, mm)."""
        return self.indices_to_labels(self.probabilities_to_classes(probabilities), spacing, postprocess)

    def probabilities_to_classes(self, probabilities: np.ndarray) -> np.ndarray:
        """Class indices ``(Z, Y, X)`` of the probabilities (see :func:`~medseg.preprocessing.regions.probabilities_to_classes`)."""
        return probabilities_to_classes(probabilities, self.plan)

    def indices_to_labels(self, seg: np.ndarray, spacing: Sequence[float], postprocess: bool = True) -> np.ndarray:
        """Class indices ``(Z, Y, X)`` -> original label ids (uint8/uint16), :attr:`postprocess` applied with
        the case's voxel ``spacing`` (mm, the map's axis order; its geometry's) unless ``postprocess`` is False."""
        out = classes_to_labels(seg, self.label_ids)
        if postprocess and self.postprocess is not None:
            out = self.postprocess(out, spacing)
        return out
