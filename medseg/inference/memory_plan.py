"""A case's memory plan: the bytes each stage of its prediction holds, against a RAM budget.

Before a case is predicted, :func:`plan_case_memory` estimates from its shapes, classes, members and options
the memory each stage holds at its peak (``B`` bytes; ``V`` voxels of the original image, ``v`` of a
configuration's preprocessed grid, ``K`` classes, ``C`` channels, ``b`` the accumulator's bytes per value,
2 above :data:`~medseg.inference.sliding_window.HALF_ACCUMULATOR_BYTES` as float32, else 4):

* ``read``: the image as read and its float32 copy, ``2 x C x V x 4``;
* ``preprocess``: the float32 image and the crop/normalise/resample copies, ``C x V x 4 + 2 x C x v x 4``;
* ``network``: the sliding window of one configuration: its ``(K, z, y, x)`` logit accumulator
  (``K x v x b``, again for a padded volume or shift TTA), the members' running sum, the weights, the
  network's forward pass (``batch x patch x 4 x (2K + 8 x features)``: measured 1.17 GB for 4 patches of
  64^3 of a 4-feature UNet with 118 classes), with mirror TTA its tile sums and a flipped output
  (``(ceil(batch / flips) + 2) x K x patch x 4``), the softmax's float32 temporaries, and
  every configuration's input and earlier configurations' probabilities;
* ``revert``: back to the original grid and the argmax, one class at a time (about 4 float32 original-grid
  volumes and the class map), while every configuration's probabilities are held; with
  ``--save-probabilities`` (or a region plan, whose thresholds need all regions) the full float32
  ``(K, Z, Y, X)`` probabilities and their float16 copy instead;
* ``export``: the label map and its copies while written.

Added to each: :data:`PROCESS_BYTES`, the interpreter, torch and the networks' weights.

When the largest stage exceeds the budget the case is **streamed** (:attr:`MemoryPlan.stream`): the
accumulators and probabilities live on a memory-mapped file (:mod:`medseg.inference.scratch`) of which at most
:attr:`MemoryPlan.window_bytes` are resident at a time, the softmax and the members' mean are computed slab
by slab along Z, and the revert reads one class at a time. The arithmetic is unchanged (the same dtypes, the
same per-voxel operations), so a streamed prediction equals the unconstrained one. Only the full-grid
probabilities that ``--save-probabilities`` writes are never streamed; a plan whose streamed peak still
exceeds the budget says so (:attr:`MemoryPlan.fits`) and the case runs anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.errors import MedsegError
from medseg.inference.case_grid import PreparedCase
from medseg.inference.members import EnsembleMember
from medseg.inference.network_runner import inference_batch_size
from medseg.inference.scratch import SLAB_BYTES, ScratchSpace
from medseg.inference.sliding_window import HALF_ACCUMULATOR_BYTES, tta_variants
from medseg.inference.time_budget import CaseSetting
from medseg.machine import available_memory_bytes
from medseg.planning.plan import Plan

logger = logging.getLogger(__name__)

#: Resident memory of a predicting process before any case: interpreter, numpy, torch, SimpleITK, networks of
#: a few MB (measured ~0.45 GB RSS on the CPU build of torch 2.13 after loading a small UNet).
PROCESS_BYTES = 450 * 2**20

#: Fraction of the available memory (``MemAvailable``) a prediction budgets for by default.
DEFAULT_BUDGET_FRACTION = 0.8

#: Least and most resident bytes of scratch pages between two releases (:mod:`medseg.inference.scratch`).
#: Fewer means more page faults re-reading the same pages; 64 MiB keeps them a small share of the run.
MIN_WINDOW_BYTES = 64 * 2**20
MAX_WINDOW_BYTES = 2 * 2**30

GB = 1e9


@dataclass(frozen=True)
class WindowJob:
    """The sliding window of one configuration of a case: what its memory depends on.

    Attributes:
        configuration: its name.
        shape: the preprocessed grid ``(z, y, x)``.
        channels: network input channels.
        members: networks of this configuration (each runs the window; their mean is kept).
        patch: the patch, ``(pz, py, px)`` or ``(py, px)`` for a 2D network.
        batch_size: network inputs per forward pass.
        base_features: the network's first-stage features (its activations scale with them).
        padded: whether the window pads the volume (smaller than the patch, or shift TTA): another
            accumulator of the padded size.
        flips: mirror-TTA flips per patch position (1: none).
    """

    configuration: str
    shape: tuple[int, ...]
    channels: int
    members: int
    patch: tuple[int, ...]
    batch_size: int
    base_features: int
    padded: bool = False
    flips: int = 1


def accumulator_bytes_per_value(num_classes: int, shape: Sequence[int]) -> int:
    """Bytes per value of the sliding window's ``(K, z, y, x)`` accumulator: 2 (float16) above
    :data:`~medseg.inference.sliding_window.HALF_ACCUMULATOR_BYTES` as float32, else 4."""
    return 2 if num_classes * int(np.prod(shape)) * 4 > HALF_ACCUMULATOR_BYTES else 4


@dataclass(frozen=True)
class MemoryPlan:
    """The memory plan of one case (:func:`plan_case_memory`); bytes.

    Attributes:
        budget_bytes: the budget (None = none).
        stages: bytes per stage of the unconstrained prediction (:data:`PROCESS_BYTES` included).
        streamed_stages: the same when streamed.
        stream: whether the case is streamed (the unconstrained peak exceeds the budget).
        window_bytes: resident scratch pages between two releases when streamed.
        accumulator: dtype of the logit accumulators (``float32`` / ``float16``).
    """

    budget_bytes: int | None
    stages: dict[str, int] = field(default_factory=dict)
    streamed_stages: dict[str, int] = field(default_factory=dict)
    stream: bool = False
    window_bytes: int = MAX_WINDOW_BYTES
    accumulator: str = "float32"

    @property
    def peak_bytes(self) -> int:
        """The unconstrained peak: the largest stage."""
        return max(self.stages.values())

    @property
    def streamed_peak_bytes(self) -> int:
        return max(self.streamed_stages.values())

    @property
    def planned_peak_bytes(self) -> int:
        """The peak of what was chosen."""
        return self.streamed_peak_bytes if self.stream else self.peak_bytes

    @property
    def fits(self) -> bool:
        """Whether the chosen way stays within the budget (True without one)."""
        return self.budget_bytes is None or self.planned_peak_bytes <= self.budget_bytes

    def scratch_space(self, case_id: str, directory: str | Path | None) -> ScratchSpace | None:
        """The scratch space of a streamed case (None when not streamed), with a warning when even the
        streamed peak exceeds the budget."""
        if not self.stream:
            return None
        if not self.fits:
            logger.warning(
                "%s: predicted with a peak of about %.1f GB even streamed; the budget is %.1f GB",
                case_id,
                self.streamed_peak_bytes / GB,
                (self.budget_bytes or 0) / GB,
            )
        return ScratchSpace(directory, self.window_bytes)

    def to_dict(self) -> dict[str, Any]:
        """The record of the plan (``prediction_record.json``), in GB (10^9 bytes)."""
        return {
            "budget_gb": None if self.budget_bytes is None else round(self.budget_bytes / GB, 3),
            "estimated_peak_gb": round(self.peak_bytes / GB, 3),
            "streamed": self.stream,
            "streamed_peak_gb": round(self.streamed_peak_bytes / GB, 3),
            "fits": self.fits,
            "accumulator": self.accumulator,
            "stages_gb": {
                k: round(v / GB, 3) for k, v in (self.streamed_stages if self.stream else self.stages).items()
            },
        }


def _forward_bytes(job: WindowJob, num_classes: int) -> int:
    return int(job.batch_size * np.prod(job.patch) * 4 * (2 * num_classes + 8 * job.base_features))


def _tta_bytes(job: WindowJob, num_classes: int) -> int:
    """Mirror TTA's float32 tile buffers: the running sums of the tiles whose flips a batch has started
    (``ceil(batch / flips) + 1`` at most) and one flipped output, ``K x patch x 4`` each."""
    if job.flips <= 1:
        return 0
    running_sums = -(-job.batch_size // job.flips) + 1
    return int((running_sums + 1) * num_classes * np.prod(job.patch) * 4)


def _padded_voxels(job: WindowJob) -> int:
    tile = job.patch if len(job.patch) == 3 else (1, *job.patch)
    return int(np.prod([max(s, t) + (t // 2 if job.padded else 0) for s, t in zip(job.shape, tile)]))


def _row_bytes(job: WindowJob, num_classes: int, b: int) -> int:
    """Bytes of one row of window positions along Z: ``K x pz x y x x x b`` (1 slice for 2D)."""
    pz = job.patch[0] if len(job.patch) == 3 else 1
    return int(num_classes * pz * np.prod(job.shape[1:]) * b)


def plan_case_memory(
    original_shape: Sequence[int],
    channels: int,
    num_classes: int,
    jobs: Sequence[WindowJob],
    budget_bytes: int | None,
    save_probabilities: bool = False,
    region_based: bool = False,
) -> MemoryPlan:
    """Plan one case's memory (see the module docstring for the stages).

    Args:
        original_shape: the image's grid ``(Z, Y, X)`` (or ``(Y, X)``).
        channels: image channels ``C``.
        num_classes: network outputs ``K``.
        jobs: one :class:`WindowJob` per configuration, in the order they run.
        budget_bytes: RAM the case may take (None = no limit: never streamed).
        save_probabilities: the full-grid probabilities are written (not streamable).
        region_based: a region plan (its revert needs every region at once).

    Returns:
        The :class:`MemoryPlan`; ``stream`` is True when the unconstrained peak exceeds the budget.
    """
    if not jobs:
        raise ValueError("a memory plan needs at least one configuration")
    k = int(num_classes)
    big_v = int(np.prod(original_shape))
    held_inputs = sum(j.channels * int(np.prod(j.shape)) * 4 for j in jobs)
    stages = {"read": 2 * channels * big_v * 4}
    stages["preprocess"] = channels * big_v * 4 + 2 * held_inputs
    streamed = dict(stages)
    network = streamed_network = 0
    probs_held = 0  # earlier configurations' probabilities (K, z, y, x)
    bs = []
    for job in jobs:
        v = int(np.prod(job.shape))
        b = accumulator_bytes_per_value(k, job.shape)
        bs.append(b)
        v_pad = _padded_voxels(job) if job.padded else 0
        accumulators = k * v * b + k * v_pad * b + (k * v * b if job.members > 1 else 0)
        softmax_tmp = (7 if b == 2 else 2) * v * 4
        common = held_inputs + job.channels * v_pad * 4 + (v + v_pad) * 4 + _forward_bytes(job, k) + _tta_bytes(job, k)
        network = max(network, common + accumulators + softmax_tmp + probs_held)
        # streamed: the accumulators' resident pages are the window (added below); the softmax's float32
        # temporaries are those of one Z slab (at most twice its SLAB_BYTES)
        streamed_network = max(streamed_network, common + 2 * SLAB_BYTES)
        probs_held += k * v * b
    stages["network"] = network
    streamed["network"] = streamed_network
    full_probs = save_probabilities or region_based
    if full_probs:
        revert = probs_held + k * big_v * 4 * 2 + k * big_v * 2
        streamed_revert = k * big_v * 4 * 2 + k * big_v * 2
    else:
        one_class = max(int(np.prod(j.shape)) * 4 for j in jobs)
        revert = probs_held + 4 * big_v * 4 + big_v + one_class
        streamed_revert = 4 * big_v * 4 + big_v + one_class
    stages["revert"] = revert
    streamed["revert"] = streamed_revert
    label_bytes = 1 if k <= 256 else 2
    stages["export"] = streamed["export"] = 3 * big_v * label_bytes
    stages = {name: value + PROCESS_BYTES for name, value in stages.items()}
    streamed = {name: value + PROCESS_BYTES for name, value in streamed.items()}
    stream = budget_bytes is not None and max(stages.values()) > budget_bytes
    # the scratch pages resident between releases: what the budget leaves beside the rest of the window stage,
    # at most a row of window positions (more is never touched at once)
    window = min(MAX_WINDOW_BYTES, max(_row_bytes(j, k, b) for j, b in zip(jobs, bs)))
    if budget_bytes is not None:
        spare = budget_bytes - streamed["network"]
        window = int(min(window, max(MIN_WINDOW_BYTES, spare)))
    streamed["network"] += window
    return MemoryPlan(
        budget_bytes=None if budget_bytes is None else int(budget_bytes),
        stages=stages,
        streamed_stages=streamed,
        stream=stream,
        window_bytes=window,
        accumulator="float16" if 2 in bs else "float32",
    )


def budget_bytes(max_ram_gb: float | str | None) -> int | None:
    """The RAM budget of ``--max-ram``: GB (10^9 bytes) given, ``"auto"`` = :data:`DEFAULT_BUDGET_FRACTION`
    of the memory available now (``MemAvailable``; None where unknown), None = no budget.

    Raises:
        MedsegError: a budget that is not a positive number, None or ``"auto"``.
    """
    if max_ram_gb is None:
        return None
    if max_ram_gb == "auto":
        available = available_memory_bytes()
        return None if available is None else int(available * DEFAULT_BUDGET_FRACTION)
    if isinstance(max_ram_gb, str) or not max_ram_gb > 0:
        raise MedsegError(f"the RAM budget must be a positive number of GB, None or 'auto', got {max_ram_gb!r}")
    return int(float(max_ram_gb) * GB)


class MemoryPlanning:
    """The memory plan of a case for a :class:`~medseg.inference.predictor.Predictor` (a mixin).

    Uses the predictor's ``members``, ``plan``, ``device``, ``use_tta``, ``tta_passes``, ``batch_size``,
    ``budget_bytes`` and ``_pass_options``.
    """

    members: list[EnsembleMember]
    plan: Plan
    device: torch.device
    use_tta: bool
    tta_passes: int | None
    batch_size: int | None
    budget_bytes: int | None
    _pass_options: Callable[[EnsembleMember], list[int]]

    def memory_plan(
        self, prepared: PreparedCase, setting: CaseSetting | None = None, save_probabilities: bool = False
    ) -> MemoryPlan:
        """The :class:`MemoryPlan` of a preprocessed case under the predictor's RAM budget.

        Args:
            prepared: the case, preprocessed for every configuration.
            setting: its TTA passes (a per-case time budget), None = the predictor's own.
            save_probabilities: whether its full-grid probabilities are written.
        """
        jobs = []
        for c, (data, _) in prepared.per_config.items():
            members = [m for m in self.members if m.configuration == c]
            stage = members[0].stage
            net = stage.network
            passes = self.tta_passes if setting is None else min(setting.passes, self._pass_options(members[0])[0])
            axes, shifts = (
                tta_variants(stage.mirror_axes, stage.total_stride, passes=passes) if self.use_tta else ((), [])
            )
            shape = tuple(int(s) for s in data.shape[1:])
            tile = net.patch_size if stage.dims == 3 else (1, *net.patch_size)
            batch = self.batch_size or inference_batch_size(
                net.patch_size, net.spec.base_features, self.plan.num_classes, self.device
            )
            jobs.append(
                WindowJob(
                    c,
                    shape,
                    self.plan.network_in_channels(c),
                    len(members),
                    tuple(int(p) for p in net.patch_size),
                    batch,
                    net.spec.base_features,
                    padded=len(shifts) > 1 or any(s < t for s, t in zip(shape, tile)),
                    flips=2 ** len(axes),
                )
            )
        return plan_case_memory(
            prepared.geometry.shape,
            self.plan.num_channels,
            self.plan.num_classes,
            jobs,
            self.budget_bytes,
            save_probabilities=save_probabilities,
            region_based=self.plan.is_region_based,
        )


__all__ = [
    "DEFAULT_BUDGET_FRACTION",
    "PROCESS_BYTES",
    "MemoryPlan",
    "WindowJob",
    "MemoryPlanning",
    "accumulator_bytes_per_value",
    "budget_bytes",
    "plan_case_memory",
]
