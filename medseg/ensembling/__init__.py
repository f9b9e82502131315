"""Choosing the best configuration / architecture / ensemble on the cross-validation."""

from __future__ import annotations

from medseg.ensembling.find_best import FindBestResult, find_best, reference_loader
from medseg.ensembling.runs import find_trained_runs, find_validation_predictions

__all__ = ["FindBestResult", "find_best", "find_trained_runs", "find_validation_predictions", "reference_loader"]
