"""The predict_folder case hook of ``--instances``: instance maps with the input's geometry beside the semantic
maps, ``instances.json`` kept across runs, scores from the ensemble's probabilities with or without
``save_probabilities``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.inference import EnsembleMember, Predictor, predict_folder
from medseg.inference.case_grid import class_probability, combine_probabilities
from medseg.io.image import ImageGeometry
from medseg.postprocessing import INSTANCES_FILE, InstanceOptions, InstanceWriter, instance_map_path
from tests.unit.inference.conftest import (
    Threshold,
    bright_box_image,
    build_plan,
    conv_net,
    threshold_predictor,
    write_oblique,
)


@pytest.fixture
def input_dir(tmp_path):
    folder = tmp_path / "in"
    for i in range(2):
        image, _ = bright_box_image(seed=i)
        image[1:3, 18:22, 15:19] += 100.0  # a second, separate object
        write_oblique(folder / f"case_{i}.nii.gz", image, origin=(1.0 * i, -2.0, 3.5))
    return folder


@pytest.mark.parametrize("save_probabilities", [False, True])
def test_instance_maps_and_table_beside_the_segmentations(input_dir, tmp_path, save_probabilities):
    out = tmp_path / "out"
    writer = InstanceWriter(out, InstanceOptions(connectivity=1))
    res = predict_folder(
        input_dir, out, threshold_predictor(), save_probabilities=save_probabilities, progress=False, case_hook=writer
    )
    assert res.ok and sorted(writer.written) == ["case_0", "case_1"]
    doc = json.loads((out / INSTANCES_FILE).read_text())
    assert doc["format"] == "medseg-instances-v1" and sorted(doc["cases"]) == ["case_0", "case_1"]
    for i in range(2):
        src = sitk.ReadImage(str(input_dir / f"case_{i}.nii.gz"))
        inst_img = sitk.ReadImage(str(out / f"case_{i}_instances.nii.gz"))
        assert inst_img.GetSize() == src.GetSize() and inst_img.GetSpacing() == src.GetSpacing()
        assert inst_img.GetOrigin() == src.GetOrigin() and inst_img.GetDirection() == src.GetDirection()
        inst = sitk.GetArrayFromImage(inst_img)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"case_{i}.nii.gz")))
        np.testing.assert_array_equal(inst > 0, seg > 0)
        entry = doc["cases"][f"case_{i}"]
        assert entry["instance_map"] == f"case_{i}_instances.nii.gz" and entry["options"]["connectivity"] == 1
        rows = entry["instances"]
        assert [r["id"] for r in rows] == [1, 2] and {r["label"] for r in rows} == {5}
        assert [r["voxels"] for r in rows] == [int((inst == r["id"]).sum()) for r in rows]
        assert sorted(r["voxels"] for r in rows) == [2 * 4 * 4, 4 * 10 * 9]
        for r in rows:
            assert 0.5 < r["score"] <= 1.0  # mean probability of class 5 where it won the argmax
            assert r["volume_ml"] == pytest.approx(r["voxels"] * 3.0 * 0.8 * 1.2 / 1000)
            points = np.array(
                [
                    src.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
                    for z, y, x in np.argwhere(inst == r["id"])
                ]
            )
            np.testing.assert_allclose(r["centroid_mm"], points.mean(axis=0), atol=1e-6)


def test_scores_agree_with_and_without_saved_probabilities(input_dir, tmp_path):
    scores = []
    for save in (False, True):
        out = tmp_path / f"out_{save}"
        writer = InstanceWriter(out)
        predict_folder(input_dir, out, threshold_predictor(), save_probabilities=save, progress=False, case_hook=writer)
        scores.append([r["score"] for c in sorted(writer.cases) for r in writer.cases[c]["instances"]])
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-5)  # both float32 means


def test_a_second_run_keeps_the_earlier_cases(input_dir, tmp_path):
    out = tmp_path / "out"
    first = tmp_path / "first"
    first.mkdir()
    (input_dir / "case_1.nii.gz").rename(first / "case_1.nii.gz")
    predict_folder(input_dir, out, threshold_predictor(), progress=False, case_hook=InstanceWriter(out))
    predict_folder(first, out, threshold_predictor(), progress=False, case_hook=InstanceWriter(out))
    doc = json.loads((out / INSTANCES_FILE).read_text())
    assert sorted(doc["cases"]) == ["case_0", "case_1"]


def test_a_failing_instance_write_fails_the_case_and_not_its_segmentation_first(input_dir, tmp_path):
    out = tmp_path / "out"

    def broken(case):
        raise OSError(28, "No space left on device")

    res = predict_folder(input_dir, out, threshold_predictor(), progress=False, case_hook=broken)
    assert sorted(res.failed) == ["case_0", "case_1"] and not res.written
    assert not list(out.glob("case_*.nii.gz"))  # a rerun predicts them again


def test_class_probability_is_one_row_of_the_combined_probabilities():
    plan = build_plan(label_ids=(0, 1, 2))
    members = [EnsembleMember(conv_net(classes=3, seed=s), plan, "3d_fullres", "unet") for s in (0, 1)]
    predictor = Predictor(members, use_tta=False)
    image, _ = bright_box_image()
    geometry = ImageGeometry(image.shape, (3.0, 1.0, 1.2), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    inferred = predictor._infer(predictor.preprocess(image[None], geometry))
    full = combine_probabilities(inferred, plan)
    for k in range(3):
        np.testing.assert_allclose(class_probability(inferred, plan, k), full[k], atol=1e-6)


def test_instance_map_path():
    assert instance_map_path(Path("/o/c.nii.gz")) == Path("/o/c_instances.nii.gz")
    assert instance_map_path(Path("/o/c.mha")) == Path("/o/c_instances.mha")


def test_a_2d_image_gets_a_2d_instance_map(tmp_path):
    plan = build_plan(spacings={"2d": (1.0, 0.8, 1.2)}, label_ids=(0, 3), median_spacing=(1.0, 0.8, 1.2))
    predictor = Predictor([EnsembleMember(Threshold(), plan, "2d", "unet")])
    box = np.zeros((30, 26), bool)
    box[6:16, 5:14] = True
    box[20:24, 18:22] = True
    image = (100.0 + 100.0 * box + np.random.default_rng(0).normal(0, 1, box.shape)).astype(np.float32)
    img = sitk.GetImageFromArray(image)
    img.SetSpacing((1.2, 0.8))
    img.SetOrigin((4.0, -2.0))
    img.SetDirection((0.0, 1.0, -1.0, 0.0))
    (tmp_path / "in").mkdir()
    sitk.WriteImage(img, str(tmp_path / "in" / "slice.nii.gz"))
    writer = InstanceWriter(tmp_path / "out")
    res = predict_folder(tmp_path / "in", tmp_path / "out", predictor, progress=False, case_hook=writer)
    assert res.ok, res.summary()
    inst_img = sitk.ReadImage(str(tmp_path / "out" / "slice_instances.nii.gz"))
    assert inst_img.GetDimension() == 2 and inst_img.GetSize() == img.GetSize()
    assert inst_img.GetOrigin() == img.GetOrigin() and inst_img.GetDirection() == img.GetDirection()
    rows = writer.cases["slice"]["instances"]
    assert sorted(r["voxels"] for r in rows) == [16, 90] and {r["label"] for r in rows} == {3}
    inst = sitk.GetArrayFromImage(inst_img)
    for r in rows:
        points = [img.TransformIndexToPhysicalPoint((int(x), int(y))) for y, x in np.argwhere(inst == r["id"])]
        np.testing.assert_allclose(r["centroid_mm"], np.mean(points, axis=0), atol=1e-9)
        assert len(r["bbox_min_mm"]) == 2 and r["volume_ml"] == pytest.approx(r["voxels"] * 1.2 * 0.8 / 1000)
