"""What a per-case time budget asks of an ensemble: the settings it may reduce to, the networks a case
runs, and each network's measured seconds per sliding-window position.

:class:`EnsembleTiming` is a base of :class:`~medseg.inference.predictor.Predictor`; the budget itself
(choosing a case's setting from these) is :mod:`medseg.inference.time_budget`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from medseg.errors import MedsegError
from medseg.inference.case_grid import PreparedCase
from medseg.inference.members import EnsembleMember
from medseg.inference.network_runner import inference_batch_size
from medseg.inference.time_budget import CaseSetting, NetworkJob, pass_options, reduction_order
from medseg.planning.plan import Plan

logger = logging.getLogger(__name__)


class EnsembleTiming:
    """Time-budget queries of a predictor over its members and previous stages (recursively).

    Uses the predictor's ``members``, ``plan``, ``previous_stages``, ``device``, ``use_tta``, ``tta_passes``,
    ``step``, ``batch_size`` and its ``_member_probabilities``; measured seconds per window are cached in
    ``_window_seconds`` (timing key -> seconds).
    """

    members: list[EnsembleMember]
    plan: Plan
    previous_stages: dict[str, Any]
    device: torch.device
    use_tta: bool
    tta_passes: int | None
    step: float
    batch_size: int | None
    _window_seconds: dict[str, float]
    _member_probabilities: Callable[..., torch.Tensor]

    def _stages(self) -> list[Any]:
        """This predictor and those of its previous stages (recursively), each once."""
        out: list[Any] = [self]
        for stage in self.previous_stages.values():
            out += [s for s in stage._stages() if all(s is not o for o in out)]
        return out

    @staticmethod
    def _timing_key(member: EnsembleMember) -> str:
        return member.stage.key  # folds of one network run equally fast

    def _pass_options(self, member: EnsembleMember) -> list[int]:
        """TTA passes ``member`` can run here, most first (its full TTA within :attr:`tta_passes`, down to 1)."""
        options = pass_options(member.stage.mirror_axes, member.stage.total_stride, self.use_tta)
        return sorted({min(p, self.tta_passes) if self.tta_passes else p for p in options}, reverse=True)

    def budget_options(self) -> list[CaseSetting]:
        """The settings a per-case time budget tries, fullest first
        (:func:`~medseg.inference.time_budget.reduction_order`): TTA passes of every member (and previous
        stage) down to 1, then less window overlap than :attr:`step`."""
        passes = {p for stage in self._stages() for m in stage.members for p in stage._pass_options(m)}
        return reduction_order(sorted(passes, reverse=True), self.step)

    def case_jobs(self, prepared: PreparedCase) -> list[NetworkJob]:
        """The networks that predict a preprocessed case and what each covers (one per member, previous
        stages included)."""
        jobs = []
        for c, (data, _) in prepared.per_config.items():
            for m in self.members:
                if m.configuration != c:
                    continue
                stage = m.stage
                jobs.append(
                    NetworkJob(
                        self._timing_key(m),
                        tuple(int(s) for s in data.shape[1:]),
                        stage.patch_size,
                        stage.mirror_axes,
                        stage.total_stride,
                        self._pass_options(m)[0],
                    )
                )
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
        net = member.stage.network
        batch = self.batch_size or inference_batch_size(
            net.patch_size, net.spec.base_features, self.plan.num_classes, self.device
        )
        patch = tuple(int(p) for p in net.patch_size)
        # `batch` windows side by side at step 1: one network batch (2D: `batch` slices)
        shape = (batch, *patch) if len(patch) == 2 else (*patch[:-1], patch[-1] * batch)
        generator = torch.Generator().manual_seed(0)
        data = torch.randn((member.stage.in_channels, *shape), generator=generator)
        seconds = []
        for _ in range(2):  # the first forward of a network and shape is slower (kernels chosen, memory mapped)
            start = time.perf_counter()
            self._member_probabilities(index, data, setting=CaseSetting(1, 1.0)).cpu()
            seconds.append(time.perf_counter() - start)
        logger.debug(
            "%s: %.3f s per window (first batch %.3f s)", self._timing_key(member), seconds[1] / batch, seconds[0]
        )
        return seconds[1] / batch
