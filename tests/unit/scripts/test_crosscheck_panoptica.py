"""scripts/crosscheck_panoptica.py without panoptica: test pairs, perturbation, comparison, worker syntax."""

from __future__ import annotations

import ast

import numpy as np

from medseg.evaluation import lesion_wise_scores
from tests.helpers import load_script


def _as_panoptica(s) -> dict[str, float]:
    """The row panoptica would give for medseg's scores where the definitions agree."""
    n_pred, n_ref = s.tp + s.fp, s.tp + s.fn
    return {
        "tp": s.tp,
        "fp": s.fp,
        "fn": s.fn,
        "prec": s.tp / n_pred if n_pred else float("nan"),
        "rec": s.tp / n_ref if n_ref else float("nan"),
        "rq": s.f1,
        "sq": s.pq / s.f1 if s.f1 else 0.0,
        "sq_dsc": s.lesion_dice * (s.tp + s.fp + s.fn) / s.tp if s.tp else 0.0,
        "sq_hd95": 0.0,
        "pq": s.pq,
    }


def test_pairs_perturbation_and_comparison():
    mod = load_script("crosscheck_panoptica")
    ast.parse(mod.PANOPTICA_WORKER)
    pairs = mod.synthetic_pairs(seed=1, n_random=3)
    assert [p[0] for p in pairs[:3]] == ["missed_small", "false_small", "two_preds_one_ref"] and len(pairs) == 9
    rows = [_as_panoptica(lesion_wise_scores(p, r, s)) for _, p, r, s in pairs]
    stats = mod.compare(pairs, rows)
    assert all(stats[k]["max_abs_diff"] <= mod.TOL for k in ("tp", "fp", "fn", "precision", "recall", "f1", "pq"))
    assert stats["lesion_dice"]["max_abs_diff"] <= mod.TOL and stats["precision"]["undefined_in_panoptica"] == 1
    rows[0] = {**rows[0], "pq": rows[0]["pq"] + 0.01}
    assert mod.compare(pairs, rows)["pq"]["max_abs_diff"] > mod.TOL  # a disagreement shows

    seg = np.zeros((6, 12, 12), np.uint8)
    seg[1:5, 1:5, 1:5] = 3
    seg[1:5, 7:11, 7:11] = 3
    seg[1:3, 7:11, 1:4] = 8
    out = mod.perturb_labels(seg, np.random.default_rng(0))
    assert set(np.unique(out)) <= {0, 3, 8} and not np.array_equal(out, seg)


def test_folder_pairs_match_predictions_to_references_by_name(tmp_path):
    from medseg.io.image import ImageGeometry, write_image

    mod = load_script("crosscheck_panoptica")
    geo = ImageGeometry((6, 12, 12), (2.0, 0.75, 0.75), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    ref = np.zeros((6, 12, 12), np.uint8)
    ref[1:5, 1:5, 1:5] = 1
    pred = ref.copy()
    pred[1:3, 8:11, 8:11] = 2
    for folder, seg in (("pred", pred), ("ref", ref)):
        write_image(seg, geo, tmp_path / folder / "a.nii.gz")
    write_image(pred, geo, tmp_path / "pred" / "no_reference.nii.gz")
    (tmp_path / "pred" / "quality.json").write_text("{}")
    pairs = mod.folder_pairs(tmp_path / "pred", tmp_path / "ref")
    assert [(name, spacing) for name, _, _, spacing in pairs] == [
        ("a:1", (2.0, 0.75, 0.75)),
        ("a:2", (2.0, 0.75, 0.75)),
    ]
    np.testing.assert_array_equal(pairs[1][1], pred == 2)
    assert not pairs[1][2].any()  # label 2 is absent from the reference: an empty reference mask
