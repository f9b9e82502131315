"""Exponential moving average of the network's weights over the last part of a run (``--weight-averaging ema``).

The average is kept in *training progress*, not in steps, so the same setting means the same thing for a
30-minute CPU budget (a couple of thousand steps) and a 1000-epoch schedule: it starts at progress
:data:`START_PROGRESS` as a copy of the weights, and each later step mixes the current weights in with

    ``decay = exp(-(progress - last_progress) / HORIZON)``,

i.e. a step's weight in the average falls by ``1/e`` for every :data:`HORIZON` of the run that follows it.
At the end of a run the average covers roughly the last 15% of it, where the learning rate (annealed to
zero) is small but the optimizer still moves: averaging those weights removes part of that noise.

The averaged weights are what ``checkpoint_final.pt`` holds (so the final validation and ``medseg
predict`` use them); ``checkpoint_latest.pt`` keeps the raw weights for ``--resume`` and the average
under ``weight_average``. Instance normalisation keeps no running statistics, so averaging parameters
is all there is to do; buffers are copied from the network.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

#: Progress (0-1) at which the average starts (a copy of the weights then).
START_PROGRESS = 0.5
#: Progress over which a step's weight in the average falls by 1/e.
HORIZON = 0.15


class WeightAverage:
    """An EMA of a network's floating-point parameters, in training progress (see the module docstring).

    Args:
        model: the (unwrapped) network whose parameters are averaged.
        start: progress at which averaging starts.
        horizon: progress over which a step's weight falls by 1/e.
    """

    def __init__(self, model: nn.Module, start: float = START_PROGRESS, horizon: float = HORIZON) -> None:
        if not 0 <= start < 1 or not horizon > 0:
            raise ValueError(f"start must be in [0, 1) and horizon > 0, got {start}, {horizon}")
        self.model = model
        self.start = start
        self.horizon = horizon
        self.names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        self.shadow: list[torch.Tensor] | None = None
        self.last_progress: float | None = None
        self.updates = 0

    def _params(self) -> list[torch.Tensor]:
        params = dict(self.model.named_parameters())
        return [params[n].detach() for n in self.names]

    @property
    def active(self) -> bool:
        """Whether the average has started (there is something to use)."""
        return self.shadow is not None

    def update(self, progress: float) -> None:
        """Mix the current weights in after an optimizer step taken at ``progress``."""
        if progress < self.start:
            return
        params = self._params()
        if self.shadow is None:
            self.shadow = [p.clone().float() for p in params]
        else:
            last = progress if self.last_progress is None else self.last_progress
            decay = math.exp(-max(progress - last, 0.0) / self.horizon)
            torch._foreach_lerp_(self.shadow, [p.float() for p in params], 1.0 - decay)
        self.last_progress = progress
        self.updates += 1

    def copy_to_model(self) -> None:
        """Write the averaged weights into the network (no-op before the average has started)."""
        if self.shadow is None:
            return
        with torch.no_grad():
            for p, s in zip(self._params(), self.shadow):
                p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "horizon": self.horizon,
            "last_progress": self.last_progress,
            "updates": self.updates,
            "shadow": None if self.shadow is None else dict(zip(self.names, (s.cpu() for s in self.shadow))),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (a checkpoint's ``weight_average``).

        Raises:
            ValueError: the stored average is for another network.
        """
        shadow = state.get("shadow")
        self.last_progress = state.get("last_progress")
        self.updates = int(state.get("updates", 0))
        if shadow is None:
            self.shadow = None
            return
        if sorted(shadow) != sorted(self.names):
            raise ValueError("the stored weight average has other parameters than the network")
        device = self._params()[0].device if self.names else torch.device("cpu")
        self.shadow = [shadow[n].to(device).float() for n in self.names]


__all__ = ["HORIZON", "START_PROGRESS", "WeightAverage"]
