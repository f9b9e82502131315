"""medseg: self-configuring medical image segmentation (plan -> train -> predict)."""

from __future__ import annotations

__version__ = "0.1.0"
