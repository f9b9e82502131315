"""Choosing the best configuration / architecture / ensemble on the cross-validation, the ensemble (and its
postprocessing) to predict with, and exporting it."""

from __future__ import annotations

from medseg.ensembling.bundle_export import export_bundle, export_networks
from medseg.ensembling.find_best import FindBestResult, find_best
from medseg.ensembling.references import reference_loader
from medseg.ensembling.runs import find_trained_runs, find_validation_predictions
from medseg.ensembling.selection import (
    RunSelection,
    bundle_ensemble,
    bundle_predictor,
    postprocess_of,
    select_work_dir_runs,
    work_dir_predictor,
)

__all__ = [
    "FindBestResult",
    "RunSelection",
    "bundle_ensemble",
    "bundle_predictor",
    "export_bundle",
    "export_networks",
    "find_best",
    "find_trained_runs",
    "find_validation_predictions",
    "postprocess_of",
    "reference_loader",
    "select_work_dir_runs",
    "work_dir_predictor",
]
