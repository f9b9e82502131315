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

__all__ = [
    "CaseFingerprint",
    "Fingerprint",
    "IntensityStats",
    "class_statistics",
    "extract_fingerprint",
    "nonzero_bbox",
]
