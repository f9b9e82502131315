"""Segmentation metrics (Dice, IoU, HD95 in mm, surface Dice) and folder evaluation."""

from __future__ import annotations

from medseg.evaluation.evaluate import EvaluationReport, evaluate_folders, summary_line, write_results
from medseg.evaluation.metrics import case_metrics, dice_from_counts, dice_iou, hd95_and_surface_dice, overlap_counts

__all__ = [
    "EvaluationReport",
    "case_metrics",
    "dice_from_counts",
    "dice_iou",
    "evaluate_folders",
    "hd95_and_surface_dice",
    "overlap_counts",
    "summary_line",
    "write_results",
]
