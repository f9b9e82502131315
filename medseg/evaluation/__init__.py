"""Segmentation metrics (Dice, IoU, HD95 in mm, surface Dice, lesion-wise scores) and folder evaluation."""

from __future__ import annotations

from medseg.evaluation.evaluate import EvaluationReport, evaluate_folders, summary_line, write_results
from medseg.evaluation.lesion_wise import (
    LESION_KEYS,
    LesionWiseOptions,
    LesionWiseScores,
    lesion_wise_case,
    lesion_wise_scores,
    selection_score,
)
from medseg.evaluation.metrics import case_metrics, dice_from_counts, dice_iou, hd95_and_surface_dice, overlap_counts

__all__ = [
    "LESION_KEYS",
    "EvaluationReport",
    "LesionWiseOptions",
    "LesionWiseScores",
    "case_metrics",
    "dice_from_counts",
    "dice_iou",
    "evaluate_folders",
    "hd95_and_surface_dice",
    "lesion_wise_case",
    "lesion_wise_scores",
    "overlap_counts",
    "selection_score",
    "summary_line",
    "write_results",
]
