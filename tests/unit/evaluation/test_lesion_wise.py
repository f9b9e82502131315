"""Lesion-wise metrics on hand-built masks: detection counts, lesion Dice/HD95, PQ, matching rules, conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.evaluation import LESION_KEYS, LesionWiseOptions, dice_iou, lesion_wise_case, lesion_wise_scores
from medseg.evaluation.lesion_wise import image_diagonal_mm, label_lesions, mean_lesion_wise, selection_score

SHAPE = (24, 40, 40)


def _ball(centre: tuple[float, ...], radius: float, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def _boxes(*spans: tuple[int, int], shape: tuple[int, int, int] = (3, 3, 40)) -> np.ndarray:
    """Boxes along the last axis of a (3, 3, 40) mask: ``[a, b)`` each, full in the other axes."""
    m = np.zeros(shape, bool)
    for a, b in spans:
        m[:, :, a:b] = True
    return m


def test_missed_small_lesion_lowers_recall_and_lesion_dice_but_barely_voxel_dice():
    big, small = _ball((12, 12, 12), 7), _ball((12, 30, 30), 1.5)
    ref, pred = big | small, big.copy()
    voxel_dice, _ = dice_iou(pred, ref)
    s = lesion_wise_scores(pred, ref, (1.0, 1.0, 1.0))
    assert voxel_dice > 0.98
    assert (s.tp, s.fp, s.fn) == (1, 0, 1)
    assert s.recall == 0.5 and s.precision == 1.0 and s.f1 == pytest.approx(2 / 3)
    assert s.lesion_dice == pytest.approx(0.5)  # (1 + 0) / 2: the missed lesion scores 0
    assert s.lesion_hd95 == pytest.approx(image_diagonal_mm(SHAPE, (1.0, 1.0, 1.0)) / 2)  # (0 + diagonal) / 2
    assert s.pq == pytest.approx(2 / 3)  # sq 1 x rq 2/3


def test_shifted_lesions_dice_iou_pq_hand_counted():
    # two boxes, each prediction shifted by 2 voxels along x: inter 8, union 12 -> IoU 2/3, Dice 0.8
    ref, pred = _boxes((0, 10), (20, 30)), _boxes((2, 12), (22, 32))
    s = lesion_wise_scores(pred, ref, (1.0, 1.0, 2.0))
    assert (s.tp, s.fp, s.fn) == (2, 0, 0)
    assert s.lesion_dice == pytest.approx(0.8) and s.pq == pytest.approx(2 / 3)
    assert s.lesion_hd95 == pytest.approx(4.0)  # 2 voxels x 2 mm along x


def test_matching_is_one_to_one():
    opts = LesionWiseOptions(iou_threshold=0.0)  # any overlap is a candidate
    # one predicted lesion over two reference lesions: it matches one of them only
    s = lesion_wise_scores(_boxes((4, 16)), _boxes((0, 10), (11, 21)), (1.0, 1.0, 1.0), opts)
    assert (s.tp, s.fp, s.fn) == (1, 0, 1)
    # two predicted lesions over one reference lesion: one is matched, the other is a false positive
    s = lesion_wise_scores(_boxes((0, 9), (11, 20)), _boxes((0, 20)), (1.0, 1.0, 1.0), opts)
    assert (s.tp, s.fp, s.fn) == (1, 1, 0)
    # the matched pair is the one of larger IoU (9/20 vs 10/20 -> the second box)
    s2 = lesion_wise_scores(_boxes((0, 9), (10, 20)), _boxes((0, 20)), (1.0, 1.0, 1.0), opts)
    assert s2.pq == pytest.approx(0.5 * (2 / 3))  # sq = IoU 0.5, rq = 2 / (2 + 1)


def test_two_predicted_blobs_over_one_reference_lesion_iou_vs_brats():
    ref, pred = _boxes((0, 20)), _boxes((0, 9), (11, 20))
    iou = lesion_wise_scores(pred, ref, (1.0, 1.0, 1.0))  # each blob has IoU 0.45 < 0.5: nothing matches
    assert (iou.tp, iou.fp, iou.fn) == (0, 2, 1) and iou.lesion_dice == 0.0 and iou.pq == 0.0
    brats = lesion_wise_scores(pred, ref, (1.0, 1.0, 1.0), LesionWiseOptions(matching="brats"))
    assert (brats.tp, brats.fp, brats.fn) == (1, 0, 0)  # both blobs count toward the one lesion
    assert brats.lesion_dice == pytest.approx(2 * 18 / (20 + 18))  # Dice of the lesion vs the blobs' union
    assert brats.pq == pytest.approx(18 / 20)


def test_brats_rule_counts_a_near_miss_within_the_dilation():
    ref, pred = _boxes((0, 10)), _boxes((12, 15))  # 2 voxels apart, no overlap
    s = lesion_wise_scores(pred, ref, (1.0, 1.0, 1.0), LesionWiseOptions(matching="brats"))
    assert (s.tp, s.fp, s.fn) == (1, 0, 0) and s.lesion_dice == 0.0
    far = lesion_wise_scores(_boxes((20, 25)), ref, (1.0, 1.0, 1.0), LesionWiseOptions(matching="brats"))
    assert (far.tp, far.fp, far.fn) == (0, 1, 1)


def test_minimum_lesion_volume_leaves_small_reference_lesions_out():
    spacing = (2.0, 1.0, 1.0)  # 2 mm^3 voxels
    ref = _boxes((0, 10), (20, 22))  # 90 voxels = 0.18 mL and 18 voxels = 0.036 mL
    pred = _boxes((0, 10), (21, 25), (30, 32))  # the small lesion poorly hit (IoU 0.2), a small false lesion
    s = lesion_wise_scores(pred, ref, spacing)
    assert (s.tp, s.fp, s.fn) == (1, 2, 1)
    s = lesion_wise_scores(pred, ref, spacing, LesionWiseOptions(min_volume_ml=0.05))
    assert (s.tp, s.fp, s.fn) == (1, 1, 0)  # the small lesion and the blob over it are left out; the false one counts
    b = lesion_wise_scores(pred, ref, spacing, LesionWiseOptions(matching="brats", min_volume_ml=0.05))
    assert (b.tp, b.fp, b.fn) == (1, 1, 0)
    comps, n = label_lesions(ref, spacing, min_volume_ml=0.05)
    assert n == 1 and int(np.count_nonzero(comps)) == 90


def test_brats_rule_joins_reference_lesions_within_the_dilation_reach():
    ref, pred = _boxes((0, 10), (12, 20)), _boxes((0, 10))  # two reference boxes 2 voxels apart
    iou = lesion_wise_scores(pred, ref, (1.0, 1.0, 1.0))
    assert (iou.tp, iou.fp, iou.fn) == (1, 0, 1)
    brats = lesion_wise_scores(pred, ref, (1.0, 1.0, 1.0), LesionWiseOptions(matching="brats"))
    assert (brats.tp, brats.fp, brats.fn) == (1, 0, 0)  # one lesion of 18 columns, 10 of them predicted
    assert brats.lesion_dice == pytest.approx(2 * 10 / (18 + 10))
    apart = lesion_wise_scores(pred, ref, (1.0, 1.0, 1.0), LesionWiseOptions(matching="brats", brats_dilation=0))
    assert (apart.tp, apart.fp, apart.fn) == (1, 0, 1)


def test_empty_case_conventions():
    empty = np.zeros(SHAPE, bool)
    lesion = _ball((12, 12, 12), 4)
    both = lesion_wise_scores(empty, empty, (1.0, 1.0, 1.0))
    assert both.to_dict() == dict(
        tp=0, fp=0, fn=0, precision=1.0, recall=1.0, f1=1.0, lesion_dice=1.0, lesion_hd95=0.0, pq=1.0
    )
    diagonal = image_diagonal_mm(SHAPE, (1.0, 1.0, 1.0))
    false = lesion_wise_scores(lesion, empty, (1.0, 1.0, 1.0))
    assert (false.tp, false.fp, false.fn) == (0, 1, 0)
    assert false.precision == false.recall == false.f1 == false.lesion_dice == false.pq == 0.0
    assert false.lesion_hd95 == pytest.approx(diagonal)
    missed = lesion_wise_scores(empty, lesion, (1.0, 1.0, 1.0))
    assert (missed.tp, missed.fp, missed.fn) == (0, 0, 1) and missed.recall == 0.0 and missed.precision == 0.0


def test_connectivity_of_diagonally_touching_voxels():
    m = np.zeros((3, 3, 3), bool)
    m[0, 0, 0] = m[1, 1, 1] = True
    assert label_lesions(m, (1.0, 1.0, 1.0))[1] == 1  # default: full connectivity
    assert label_lesions(m, (1.0, 1.0, 1.0), connectivity=1)[1] == 2


def test_matches_panoptica_numbers_on_a_shared_case():
    # the "shifted" case of scripts/crosscheck_panoptica.py; panoptica 2.1.7 (MaxBipartiteMatching at IoU 0.5,
    # cc3d components) gives tp 2, fp 0, fn 0, rq 1, sq 0.806452, sq_dsc 0.88, pq 0.806452
    big, small = _ball((12, 12, 12), 6), _ball((12, 30, 30), 2)
    s = lesion_wise_scores(np.roll(big, 2, axis=2) | small, big | small, (3.0, 1.0, 1.0))
    assert (s.tp, s.fp, s.fn) == (2, 0, 0) and s.f1 == 1.0
    assert s.pq == pytest.approx(0.806452, abs=1e-6) and s.lesion_dice == pytest.approx(0.88, abs=1e-9)


def test_label_map_means_and_selection_score():
    ref = np.zeros((3, 3, 40), np.uint8)
    ref[_boxes((0, 10))] = 1
    ref[_boxes((20, 30))] = 2
    pred = ref.copy()
    pred[pred == 2] = 0
    per = lesion_wise_case(pred, ref, (1.0, 1.0, 1.0), [1, 2])
    assert list(per[1]) == list(LESION_KEYS)
    assert per[1]["f1"] == 1.0 and per[2]["fn"] == 1 and per[2]["f1"] == 0.0
    mean = mean_lesion_wise([per[1], per[2], {**per[2], "lesion_hd95": math.nan}])
    assert mean["fn"] == 2 and mean["f1"] == pytest.approx(1 / 3)
    assert mean["lesion_hd95"] == pytest.approx((per[1]["lesion_hd95"] + per[2]["lesion_hd95"]) / 2)  # NaN skipped
    assert selection_score(pred == 2, ref == 2, "lesion_f1") == 0.0
    assert selection_score(pred == 1, ref == 1, "pq") == 1.0
    with pytest.raises(ValueError):
        selection_score(pred == 1, ref == 1, "dice")
