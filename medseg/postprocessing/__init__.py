"""Postprocessing of predicted label maps: connected components and morphology, fitted on cross-validation."""

from __future__ import annotations

from medseg.postprocessing.fit import DEFAULT_FRACTIONS, describe_rules, fit_postprocessing
from medseg.postprocessing.operations import (
    RULES_FORMAT,
    apply_postprocessing,
    keep_components,
    load_rules,
    save_rules,
)

__all__ = [
    "DEFAULT_FRACTIONS",
    "RULES_FORMAT",
    "apply_postprocessing",
    "describe_rules",
    "fit_postprocessing",
    "keep_components",
    "load_rules",
    "save_rules",
]
