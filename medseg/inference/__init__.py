"""Inference: sliding window with Gaussian weighting and mirror TTA, ensemble predictor, folder prediction."""

from __future__ import annotations

from medseg.inference.export import write_probabilities, write_segmentation
from medseg.inference.folder import PredictionResult, predict_folder
from medseg.inference.members import EnsembleMember, load_member
from medseg.inference.predictor import Predictor
from medseg.inference.sliding_window import predict_sliding_window
from medseg.inference.tiling import gaussian_importance_map

__all__ = [
    "EnsembleMember",
    "PredictionResult",
    "Predictor",
    "gaussian_importance_map",
    "load_member",
    "predict_folder",
    "predict_sliding_window",
    "write_probabilities",
    "write_segmentation",
]
