"""Evaluation with an ignore label: reference voxels holding it are left out of prediction and reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.evaluation import evaluate_folders
from medseg.io.image import ImageGeometry, write_image
from medseg.training.validation import dice_per_label

GEO = ImageGeometry((6, 10, 12), (3.0, 1.0, 1.2), (5.0, -3.0, 2.0), (1, 0, 0, 0, 0, -1, 0, 1, 0))
IGNORE = 3


def _maps():
    ref = np.zeros(GEO.shape, np.uint8)
    ref[1:4, 2:6, 3:8] = 1
    ref[2:5, 6:9, 2:5] = 2
    pred = ref.copy()
    pred[0] = 1  # wrong, but only where the reference is unannotated
    pred[5, :5] = 2
    ref[0] = IGNORE
    ref[5] = IGNORE
    ref[1, 2:6, 3:5] = IGNORE  # part of a structure unannotated; the prediction there (1) is not counted
    return pred, ref


def _write(folder: Path, name: str, arr: np.ndarray) -> None:
    write_image(arr, GEO, folder / f"{name}.nii.gz")


def _expected_dice(pred, ref, lab):
    keep = ref != IGNORE
    p, r = pred[keep] == lab, ref[keep] == lab
    return 2 * np.logical_and(p, r).sum() / (p.sum() + r.sum())


def test_ignored_reference_voxels_are_left_out(tmp_path):
    pred, ref = _maps()
    _write(tmp_path / "pred", "c", pred)
    _write(tmp_path / "ref", "c", ref)
    res = evaluate_folders(tmp_path / "pred", tmp_path / "ref", ignore_label=IGNORE, progress=False)
    assert res["label_ids"] == [1, 2] and res["ignore_label"] == IGNORE  # the ignore id is no label
    (case,) = res["cases"]
    assert case["labels"]["1"]["dice"] == 1.0 and case["labels"]["2"]["dice"] == 1.0
    assert case["ignored_voxels"] == int((ref == IGNORE).sum())
    assert case["labels"]["1"]["n_ref"] == int((ref == 1).sum())
    plain = evaluate_folders(tmp_path / "pred", tmp_path / "ref", progress=False)  # without: the errors count
    assert plain["label_ids"] == [1, 2, 3] and plain["cases"][0]["labels"]["1"]["dice"] < 1.0


def test_ignore_label_is_read_from_the_reference_dataset_json(tmp_path):
    pred, ref = _maps()
    pred[4, 2:6, 3:8] = 2  # a real error on annotated voxels
    data = tmp_path / "data"
    _write(tmp_path / "pred", "c", pred)
    _write(data / "labelsTr", "c", ref)
    _write(data / "imagesTr", "c", np.ones(GEO.shape, np.float32))
    (data / "dataset.json").write_text(
        json.dumps(
            {
                "modality": {"0": "MRI"},
                "labels": {"0": "background", "1": "a", "2": "b", "3": "ignore"},
                "training": [{"image": "./imagesTr/c.nii.gz", "label": "./labelsTr/c.nii.gz"}],
            }
        )
    )
    for ref_dir in (data, data / "labelsTr"):
        res = evaluate_folders(tmp_path / "pred", ref_dir, progress=False)
        assert res["ignore_label"] == IGNORE and res["label_ids"] == [1, 2]
        for lab in (1, 2):
            assert res["cases"][0]["labels"][str(lab)]["dice"] == pytest.approx(_expected_dice(pred, ref, lab))


def test_final_validation_dice_skips_ignored_voxels():
    pred, ref = _maps()
    pred[4, 2:6, 3:8] = 2
    got = dice_per_label(pred, ref, [1, 2], ignore_label=IGNORE)
    assert got == {str(lab): pytest.approx(_expected_dice(pred, ref, lab)) for lab in (1, 2)}
    assert dice_per_label(pred, ref, [1, 2])["1"] < got["1"]
