"""Dataset fingerprint: spacings, shapes, foreground intensities and class statistics of every case."""

from __future__ import annotations

from medseg.fingerprint.fingerprint import (
    CaseFingerprint,
    Fingerprint,
    IntensityStats,
    class_statistics,
    extract_fingerprint,
    nonzero_bbox,
)
from medseg.fingerprint.image_statistics import image_percentiles

__all__ = [
    "CaseFingerprint",
    "Fingerprint",
    "IntensityStats",
    "class_statistics",
    "extract_fingerprint",
    "image_percentiles",
    "nonzero_bbox",
]
