"""evaluate_folders on tiny NIfTI files: JSON/CSV output, empty cases, geometry mismatch errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.evaluation import evaluate_folders
from medseg.io.image import ImageGeometry, write_image

GEO = ImageGeometry((6, 10, 12), (3.0, 1.0, 1.2), (5.0, -3.0, 2.0), (1, 0, 0, 0, 0, -1, 0, 1, 0))


def _write(folder: Path, name: str, arr: np.ndarray, geo: ImageGeometry = GEO) -> None:
    write_image(arr.astype(np.uint8), geo, folder / f"{name}.nii.gz")


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    a = np.zeros(GEO.shape, np.uint8)
    a[1:4, 2:6, 3:8] = 1
    a[2:5, 6:9, 2:5] = 2
    _write(pred, "c1", a)
    _write(ref, "c1", a)  # perfect
    b = a.copy()
    b[b == 2] = 0  # label 2 missed entirely
    _write(pred, "c2", b)
    _write(ref, "c2", a)
    _write(ref, "c3", a)  # reference without prediction
    return pred, ref


def test_metrics_json_csv_and_summary(folders, tmp_path):
    pred, ref = folders
    out = tmp_path / "eval" / "metrics.json"
    res = evaluate_folders(pred, ref, output=out, progress=False)
    assert res["num_cases"] == 2 and res["label_ids"] == [1, 2]
    assert res["missing_predictions"] == ["c3"]
    c1, c2 = res["cases"]
    assert c1["labels"]["1"]["dice"] == 1.0 and c1["labels"]["2"]["hd95"] == 0.0
    assert c2["labels"]["2"]["dice"] == 0.0 and c2["labels"]["2"]["hd95_undefined"]
    assert res["mean"]["2"]["dice"] == pytest.approx(0.5)
    assert res["mean"]["2"]["hd95"] == 0.0 and res["mean"]["2"]["hd95_undefined_cases"] == 1
    assert res["foreground_mean"]["dice"] == pytest.approx(0.75)
    assert "0.7500" in res.summary()
    saved = json.loads(out.read_text())
    assert saved["cases"][1]["labels"]["2"]["hd95"] is None  # inf stored as null
    csv_lines = out.with_suffix(".csv").read_text().splitlines()
    assert csv_lines[0].startswith("case,label,dice")
    assert len(csv_lines) == 1 + 2 * 2


def test_given_labels_and_parallel_workers(folders):
    pred, ref = folders
    res = evaluate_folders(pred, ref, label_ids=[2, 5], num_workers=2, progress=False)
    assert res["label_ids"] == [2, 5]
    assert res["mean"]["5"]["dice"] == 1.0  # absent everywhere: empty vs empty
    assert res["mean"]["2"]["dice"] == pytest.approx(0.5)


def test_geometry_mismatch_names_the_case(folders):
    pred, ref = folders
    moved = ImageGeometry(GEO.shape, GEO.spacing, (9.0, -3.0, 2.0), GEO.direction)
    _write(pred, "c1", np.zeros(GEO.shape), moved)
    shape = ImageGeometry((6, 10, 11), GEO.spacing, GEO.origin, GEO.direction)
    _write(pred, "c2", np.zeros(shape.shape), shape)
    with pytest.raises(MedsegError) as err:
        evaluate_folders(pred, ref, progress=False)
    msg = str(err.value)
    assert "case c1" in msg and "origin" in msg and "case c2" in msg and "shape" in msg


def test_prediction_without_reference_and_empty_folder(folders, tmp_path):
    pred, ref = folders
    _write(pred, "c9", np.zeros(GEO.shape))
    with pytest.raises(MedsegError, match="c9"):
        evaluate_folders(pred, ref, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedsegError, match="no segmentation files"):
        evaluate_folders(tmp_path / "empty", ref, progress=False)


def test_instance_maps_beside_the_segmentations_are_not_cases(folders):
    pred, ref = folders
    ids = np.zeros(GEO.shape, np.uint8)
    ids[1:4, 2:6, 3:8] = 7  # object ids, not labels: scored as a case they would fail
    _write(pred, "c1_instances", ids)  # `medseg predict --instances` beside c1
    result = evaluate_folders(pred, ref, progress=False)
    assert sorted(c["case"] for c in result["cases"]) == ["c1", "c2"]
    # without its case beside it, a file named *_instances is a prediction like any other
    _write(pred, "c5_instances", ids)
    with pytest.raises(MedsegError, match="c5_instances"):
        evaluate_folders(pred, ref, progress=False)
