"""Lookahead (Zhang, Lucas, Hinton & Ba 2019, "Lookahead Optimizer: k steps forward, 1 step back").

An inner optimizer (SGD or AdamW) moves the network's weights, the *fast* weights, as usual. Every ``k``
of its steps the *slow* weights, a copy kept beside them, move a fraction ``alpha`` of the way towards the
fast weights, and the fast weights restart from there:

    ``slow <- slow + alpha * (fast - slow)``,  ``fast <- slow``.

The slow weights are copied from the network at the first step (so weights loaded after the optimizer was
built, e.g. pretrained ones, are where Lookahead starts). A step the trainer skips for non-finite
gradients is no step of the inner optimizer and does not count. :meth:`Lookahead.state_dict` holds the
inner optimizer's state, the slow weights and the step counter, so a resumed run continues exactly.

The learning rate is the inner optimizer's: :attr:`Lookahead.param_groups` *are* its parameter groups, so
the trainer's schedule and a gradient scaler act on it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class Lookahead(torch.optim.Optimizer):
    """Lookahead around ``inner``; see the module docstring.

    Args:
        inner: the optimizer that computes the steps (its parameters are the fast weights).
        k: inner steps between two synchronisations (>= 1).
        alpha: step size of the slow weights towards the fast ones, in (0, 1].

    Raises:
        ValueError: ``k`` or ``alpha`` out of range.
    """

    def __init__(self, inner: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        if k < 1 or not 0.0 < alpha <= 1.0:
            raise ValueError(f"Lookahead needs k >= 1 and alpha in (0, 1], got k={k}, alpha={alpha}")
        params = [p for group in inner.param_groups for p in group["params"]]
        super().__init__(params, {})  # the base sets up the step hooks; groups and state are the inner's
        self.inner, self.k, self.alpha = inner, int(k), float(alpha)
        self.param_groups = inner.param_groups
        self.defaults = inner.defaults
        self.state = inner.state
        self.params = params
        self.fast_steps = 0  # inner steps taken (the slow weights sync after every k-th)
        self.slow: list[torch.Tensor] | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One inner step; every ``k``-th also moves the slow weights and resets the fast ones to them.

        Returns:
            What the inner optimizer's step returned (the closure's loss, or None).
        """
        if self.slow is None:
            self.slow = [p.detach().clone() for p in self.params]
        if closure is None:
            loss = self.inner.step()
        else:
            with torch.enable_grad():
                loss = self.inner.step(closure)
        self.fast_steps += 1
        if self.fast_steps % self.k == 0:
            for p, s in zip(self.params, self.slow, strict=True):
                s.lerp_(p.detach(), self.alpha)
                p.copy_(s)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's ``zero_grad``."""
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """``{"inner": <inner optimizer state>, "lookahead": {k, alpha, fast_steps, slow}}`` (``slow``: one
        tensor per parameter, in the inner optimizer's order, or None before the first step)."""
        slow = None if self.slow is None else [s.clone() for s in self.slow]
        return {
            "inner": self.inner.state_dict(),
            "lookahead": {"k": self.k, "alpha": self.alpha, "fast_steps": self.fast_steps, "slow": slow},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`.

        Raises:
            KeyError: ``state_dict`` is not a Lookahead state (e.g. of a plain SGD or AdamW run).
            ValueError: its slow weights do not match the parameters.
        """
        inner_state, own = state_dict["inner"], state_dict["lookahead"]
        slow = own["slow"]
        if slow is not None and (
            len(slow) != len(self.params) or any(s.shape != p.shape for s, p in zip(slow, self.params, strict=False))
        ):
            raise ValueError("the Lookahead slow weights do not match the network's parameters")
        self.inner.load_state_dict(inner_state)
        self.fast_steps = int(own["fast_steps"])
        self.slow = (
            None
            if slow is None
            else [s.detach().to(device=p.device, dtype=p.dtype).clone() for s, p in zip(slow, self.params, strict=True)]
        )


__all__ = ["Lookahead"]
