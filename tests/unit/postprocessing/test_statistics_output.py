"""``statistics.json`` / ``statistics.csv`` of ``predict --statistics`` through predict_folder's case hook,
combined with the instance and preview hooks; every label listed; earlier rows kept on a rerun; skipped
cases reported from their existing segmentations."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.inference import predict_folder
from medseg.inference.case_output import FinishedCase, combine_hooks
from medseg.io.image import ImageGeometry, write_image
from medseg.postprocessing import (
    INSTANCES_FILE,
    STATISTICS_CSV,
    STATISTICS_FILE,
    InstanceWriter,
    PreviewWriter,
    StatisticsWriter,
    revisit_skipped,
)
from medseg.postprocessing.statistics_output import CSV_COLUMNS
from tests.unit.inference.conftest import bright_box_image, threshold_predictor, write_oblique

NAMES = {0: "background", 5: "lesion"}


@pytest.fixture
def input_dir(tmp_path):
    folder = tmp_path / "in"
    for i in range(2):
        image, _ = bright_box_image(seed=i)
        write_oblique(folder / f"case_{i}.nii.gz", image, origin=(1.0 * i, -2.0, 3.5))
    return folder


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_statistics_beside_instances_and_previews(input_dir, tmp_path):
    out = tmp_path / "out"
    stats, previews, instances = StatisticsWriter(out, NAMES), PreviewWriter(out, NAMES), InstanceWriter(out)
    hook = combine_hooks([instances, None, stats, previews])
    res = predict_folder(input_dir, out, threshold_predictor(), progress=False, case_hook=hook)
    assert res.ok and sorted(stats.written) == sorted(previews.written) == sorted(instances.written) == [
        "case_0",
        "case_1",
    ]
    assert (out / INSTANCES_FILE).is_file() and previews.missing(["case_0", "case_1", "case_9"]) == ["case_9"]
    doc = json.loads((out / STATISTICS_FILE).read_text())
    assert doc["format"] == "medseg-statistics-v1" and "26" in doc["connectivity"]
    assert sorted(doc["cases"]) == ["case_0", "case_1"]
    rows = read_csv(out / STATISTICS_CSV)
    assert tuple(rows[0]) == CSV_COLUMNS and [(r["case"], r["label"]) for r in rows] == [
        ("case_0", "5"),
        ("case_1", "5"),
    ]
    for i, row in enumerate(rows):
        image = sitk.ReadImage(str(input_dir / f"case_{i}.nii.gz"))
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"case_{i}.nii.gz")))
        mask = seg == 5
        entry = doc["cases"][f"case_{i}"]
        assert entry["segmentation"] == f"case_{i}.nii.gz" and entry["source"] == "predicted"
        (s,) = entry["structures"]
        assert (s["label"], s["name"], s["voxels"]) == (5, "lesion", int(mask.sum())) and s["voxels"] > 0
        assert s["volume_ml"] == pytest.approx(mask.sum() * np.prod(image.GetSpacing()) / 1000)
        values = sitk.GetArrayFromImage(image)[mask].astype(np.float64)
        assert s["intensity_mean"] == pytest.approx(values.mean()) and s["intensity_std"] == pytest.approx(values.std())
        assert s["components"] >= 1 and len(s["bbox_min_mm"]) == 3
        # the CSV holds the JSON's numbers
        assert int(row["voxels"]) == s["voxels"] and float(row["volume_ml"]) == pytest.approx(s["volume_ml"])
        assert [float(row[f"bbox_max_{a}_mm"]) for a in "xyz"] == pytest.approx(s["bbox_max_mm"])
        assert float(row["intensity_mean"]) == pytest.approx(s["intensity_mean"])
        assert (out / "previews" / f"case_{i}.png").is_file()


def test_every_model_label_is_listed_and_absent_ones_are_empty(tmp_path):
    geo = ImageGeometry((4, 5, 6), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    labels = np.zeros(geo.shape, np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    image_path = tmp_path / "in" / "c_0000.nii.gz"
    write_image(np.arange(np.prod(geo.shape), dtype=np.int16).reshape(geo.shape), geo, image_path)
    case = FinishedCase("c", labels, geo, (0, 1, 2), None, tmp_path / "out" / "c.nii.gz", image_path)
    writer = StatisticsWriter(tmp_path / "out", {1: "liver"})
    writer(case)
    rows = read_csv(writer.csv_path)
    assert [(r["label"], r["name"], r["voxels"], r["volume_ml"]) for r in rows] == [
        ("1", "liver", "8", repr(8 * 2.0 / 1000)),
        ("2", "label 2", "0", "0.0"),
    ]
    assert rows[1]["bbox_min_x_mm"] == rows[1]["intensity_mean"] == ""  # absent: empty cells, null in JSON
    absent = json.loads(writer.path.read_text())["cases"]["c"]["structures"][1]
    assert absent["bbox_min_mm"] is None and absent["intensity_std"] is None and absent["components"] == 0

    bad = FinishedCase(
        "d",
        labels[:2],
        ImageGeometry((2, 5, 6), geo.spacing, geo.origin, geo.direction),
        (0, 1),
        None,
        case.segmentation_path,
        image_path,
    )
    with pytest.raises(MedsegError, match="differs from the segmentation"):
        writer(bad)


def test_a_rerun_keeps_earlier_rows_and_reports_skipped_cases_from_their_segmentations(input_dir, tmp_path):
    out = tmp_path / "out"
    first = tmp_path / "first"
    first.mkdir()
    shutil.copy(input_dir / "case_0.nii.gz", first / "case_0.nii.gz")
    predictor = threshold_predictor()
    predict_folder(first, out, predictor, progress=False, case_hook=StatisticsWriter(out, NAMES))
    earlier = json.loads((out / STATISTICS_FILE).read_text())["cases"]["case_0"]

    # second run, on both cases: case_0 is skipped (its segmentation exists) and keeps its row
    stats = StatisticsWriter(out, NAMES)
    res = predict_folder(input_dir, out, predictor, progress=False, case_hook=stats)
    assert res.skipped == ["case_0"] and stats.written == ["case_1"]
    doc = json.loads((out / STATISTICS_FILE).read_text())
    assert sorted(doc["cases"]) == ["case_0", "case_1"] and doc["cases"]["case_0"] == earlier
    assert [r["case"] for r in read_csv(out / STATISTICS_CSV)] == ["case_0", "case_1"]
    assert revisit_skipped(input_dir, out, res.skipped, 1, predictor.plan.label_ids, [stats]).done == []

    # statistics lost, previews never drawn: a rerun computes both from the existing segmentations
    (out / STATISTICS_FILE).unlink()
    stats, previews = StatisticsWriter(out, NAMES), PreviewWriter(out, NAMES)
    res = predict_folder(input_dir, out, predictor, progress=False, case_hook=combine_hooks([stats, previews]))
    assert sorted(res.skipped) == ["case_0", "case_1"] and stats.written == []
    done = revisit_skipped(input_dir, out, res.skipped, 1, predictor.plan.label_ids, [stats, previews])
    assert done.done == ["case_0", "case_1"] and not done.failed
    doc = json.loads((out / STATISTICS_FILE).read_text())
    assert doc["cases"]["case_0"]["source"] == "existing segmentation"
    assert doc["cases"]["case_0"]["structures"] == earlier["structures"]  # the same numbers from the file
    assert previews.missing(["case_0", "case_1"]) == []

    # an unreadable existing segmentation fails its case only
    (out / STATISTICS_FILE).unlink()
    (out / "case_1.nii.gz").write_bytes(b"not an image")
    stats = StatisticsWriter(out, NAMES)
    done = revisit_skipped(input_dir, out, ["case_0", "case_1"], 1, predictor.plan.label_ids, [stats])
    assert done.done == ["case_0"] and list(done.failed) == ["case_1"] and "case_1.nii.gz" in done.failed["case_1"]


def test_an_unreadable_earlier_file_starts_a_new_one(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / STATISTICS_FILE).write_text("{broken")
    assert StatisticsWriter(out).cases == {}
    assert "cannot read the earlier statistics" in caplog.text


def test_combined_hooks_run_in_order_and_the_first_failure_stops_the_rest():
    calls: list[str] = []

    def hook(name: str, fail: bool = False):
        def run(case: object) -> None:
            calls.append(name)
            if fail:
                raise MedsegError(name)

        return run

    assert combine_hooks([None, None]) is None
    single = hook("a")
    assert combine_hooks([None, single]) is single
    combined = combine_hooks([hook("a"), hook("b", fail=True), hook("c")])
    assert combined is not None
    with pytest.raises(MedsegError, match="b"):
        combined(object())  # type: ignore[arg-type]
    assert calls == ["a", "b"]


def test_the_hooks_of_a_case_share_one_read_of_its_image(tmp_path, monkeypatch):
    import medseg.inference.case_output as case_output

    geo = ImageGeometry((4, 5, 6), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    labels = np.zeros(geo.shape, np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    image_path = tmp_path / "in" / "c_0000.nii.gz"
    write_image(np.arange(np.prod(geo.shape), dtype=np.int16).reshape(geo.shape), geo, image_path)
    reads: list[Path] = []
    real = case_output.read_image
    monkeypatch.setattr(case_output, "read_image", lambda path: reads.append(path) or real(path))
    case = FinishedCase("c", labels, geo, (0, 1), None, tmp_path / "out" / "c.nii.gz", image_path)
    hooks = combine_hooks([StatisticsWriter(tmp_path / "out"), PreviewWriter(tmp_path / "out")])
    assert hooks is not None
    hooks(case)
    assert reads == [image_path]  # statistics and preview: one read
    assert not case.input_image().flags.writeable  # shared, so no hook may change it
    assert (tmp_path / "out" / "previews" / "c.png").is_file()
