"""Region plans: region probabilities -> labels (regions_class_order), region masks, Dice per region;
the sliding window's sigmoid; evaluate_folders per region."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from medseg.evaluation import evaluate_folders
from medseg.inference.sliding_window import predict_sliding_window
from medseg.io.image import ImageGeometry, write_image
from medseg.preprocessing.regions import (
    dice_per_region,
    probabilities_to_classes,
    region_key,
    region_masks,
    regions_to_classes,
    regions_to_labels,
)

from ..planning.test_plan_dataclasses import make_plan

REGIONS = ((1, 2, 3), (2, 3), (3,))


def test_later_regions_overwrite_earlier_ones():
    probs = np.array(
        [
            [0.9, 0.9, 0.9, 0.2, 0.5],  # all
            [0.1, 0.8, 0.8, 0.9, 0.1],  # inner
            [0.0, 0.0, 0.7, 0.6, 0.0],
        ]
    )  # small
    assert regions_to_labels(probs, (1, 2, 3)).tolist() == [1, 2, 3, 3, 0]  # 0.5 is not > 0.5
    assert regions_to_labels(probs, (3, 2, 1)).tolist() == [3, 2, 1, 1, 0]
    assert regions_to_labels(probs, (1, 2, 3)).dtype == np.uint8
    # class indices of label_ids (0, 5, 117, 200)
    assert regions_to_classes(probs, (0, 5, 117, 200), (5, 117, 200)).tolist() == [1, 2, 3, 3, 0]
    with pytest.raises(ValueError, match="regions_class_order"):
        regions_to_labels(probs, (1, 2))


def test_probabilities_to_classes_argmax_or_regions():
    plan = make_plan()  # label_ids (0, 1, 5, 117)
    probs = np.array([[0.1, 0.7], [0.2, 0.1], [0.6, 0.1], [0.1, 0.1]])
    assert probabilities_to_classes(probs, plan).tolist() == [2, 0]
    rplan = dataclasses.replace(plan, regions=((1, 5), (5,)), regions_class_order=(1, 5)).validate()
    assert probabilities_to_classes(np.array([[0.9, 0.9], [0.6, 0.2]]), rplan).tolist() == [2, 1]


def test_region_masks_and_dice():
    labels = np.array([0, 1, 2, 3, 3])
    masks = region_masks(labels, REGIONS)
    assert masks.tolist() == [
        [False, True, True, True, True],
        [False, False, True, True, True],
        [False, False, False, True, True],
    ]
    pred = np.array([0, 1, 1, 3, 0])
    d = dice_per_region(pred, labels, REGIONS)
    assert list(d) == ["(1, 2, 3)", "(2, 3)", "3"]
    assert d["(1, 2, 3)"] == pytest.approx(2 * 3 / (3 + 4)) and d["3"] == pytest.approx(2 / 3)
    assert dice_per_region(np.zeros(3, int), np.zeros(3, int), REGIONS)["3"] is None
    ref = np.array([0, 1, 2, 9, 9])  # 9 = ignore
    assert dice_per_region(np.array([0, 1, 2, 3, 3]), ref, REGIONS, ignore_label=9)["(2, 3)"] == 1.0
    assert region_key((4,)) == "4" and region_key((1, 2)) == "(1, 2)"


class Identity3d(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4.0 * x - 2.0


def test_sliding_window_sigmoid_is_per_channel():
    x = torch.rand((3, 10, 9, 12), generator=torch.Generator().manual_seed(0))
    out = predict_sliding_window(Identity3d(), x, (8, 8, 8), 3, mirror_axes=(0, 1, 2), activation="sigmoid")
    torch.testing.assert_close(out, torch.sigmoid(4.0 * x - 2.0), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="activation"):
        predict_sliding_window(Identity3d(), x, (8, 8, 8), 3, activation="relu")


def test_sliding_window_sigmoid_on_a_float16_accumulator(monkeypatch):
    import medseg.inference.sliding_window as sw

    x = torch.rand((5, 9, 10, 11), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(sw, "HALF_ACCUMULATOR_BYTES", 0)  # every output counts as large
    out = predict_sliding_window(Identity3d(), x, (8, 8, 8), 5, activation="sigmoid")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), torch.sigmoid(4.0 * x - 2.0), atol=2e-3, rtol=0)


def test_evaluate_folders_per_region(tmp_path):
    geo = ImageGeometry((4, 6, 6), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    ref = np.zeros(geo.shape, np.uint8)
    ref[1:3, 1:5, 1:5] = 1
    ref[1:3, 2:4, 2:4] = 3
    pred = ref.copy()
    pred[pred == 3] = 2  # inner right, small missed
    write_image(ref, geo, tmp_path / "ref" / "c1.nii.gz")
    write_image(pred, geo, tmp_path / "pred" / "c1.nii.gz")
    result = evaluate_folders(tmp_path / "pred", tmp_path / "ref", regions=[(1, 2, 3), (2, 3), (3,)], progress=False)
    assert result["regions"] == [[1, 2, 3], [2, 3], [3]]
    dice = {k: v["dice"] for k, v in result["mean"].items()}
    assert dice == {"(1, 2, 3)": 1.0, "(2, 3)": 1.0, "3": 0.0}
    assert result["foreground_mean"]["dice"] == pytest.approx(2 / 3)
