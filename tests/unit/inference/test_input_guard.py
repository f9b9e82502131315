"""The input guard: fires on a CT given to an MR model, on a 4x spacing change, a flipped orientation and an
unlike intensity range; stays quiet on held-out cases of the training data; old fingerprints stay readable."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from medseg.fingerprint import Fingerprint, extract_fingerprint
from medseg.inference import predict_folder
from medseg.inference.input_guard import TrainingRange, axis_codes, channel_modality, check_input
from medseg.io.dataset import load_dataset
from medseg.io.image import read_channels

from .conftest import bright_box_image, threshold_predictor, write_oblique

TRAIN, HELD_OUT = 12, 4


@pytest.fixture(scope="module")
def hippocampus(request):
    """(training range of the first 12 hippocampus cases, the next 4 cases' (image, geometry))."""
    from tests.conftest import SHARED_DATA

    ds = load_dataset(SHARED_DATA / "hippocampus")
    train = dataclasses.replace(ds, cases=ds.cases[:TRAIN])
    fp = extract_fingerprint(train, progress=False)
    held_out = [read_channels(list(c.image_files)) for c in ds.cases[TRAIN : TRAIN + HELD_OUT]]
    return fp, held_out


def test_quiet_on_held_out_cases_of_the_training_data(hippocampus):
    fp, held_out = hippocampus
    tr = TrainingRange.from_fingerprint(fp)
    assert tr.modalities == ("MR",) and tr.num_cases == TRAIN and len(tr.percentiles_min) == 1
    for i, (image, geometry) in enumerate(held_out):
        assert check_input(image, geometry, tr, f"case{i}") == []


def test_ct_given_to_an_mr_model(hippocampus, shared_data):
    tr = TrainingRange.from_fingerprint(hippocampus[0])
    image, geometry = read_channels([shared_data / "totalseg_ct" / "imagesTr" / "example_ct_sm.nii.gz"])
    lines = check_input(image, geometry, tr, "ct")
    assert lines[0].startswith("ct: channel 0 looks like a CT") and "MR" in lines[0]
    assert all("\n" not in line and line.startswith("ct: ") for line in lines)
    # ... and an MR image given to a CT model (the totalseg_ct cases' range)
    ct_range = TrainingRange.from_fingerprint(
        extract_fingerprint(load_dataset(shared_data / "totalseg_ct"), progress=False)
    )
    assert ct_range.modalities == ("CT",) and ct_range.percentiles_max[0][0] < -500
    mr_image, mr_geometry = hippocampus[1][0]
    assert check_input(mr_image, mr_geometry, ct_range, "mr")[0].startswith("mr: channel 0 has no voxel below 0")
    # training images that never go below 0 (a CT stored with an offset) overrule the channel name
    offset_ct = dataclasses.replace(tr, channel_names=("CT",))
    assert not [line for line in check_input(mr_image, mr_geometry, offset_ct, "mr") if "look like a CT" in line]
    name_only = dataclasses.replace(offset_ct, percentiles_min=(), percentiles_max=())
    assert "does not look like a CT" in check_input(mr_image, mr_geometry, name_only, "mr")[0]


@pytest.mark.parametrize("factor", [4.0, 0.25])
def test_spacing_change_fires_only_the_spacing_check(hippocampus, factor):
    tr = TrainingRange.from_fingerprint(hippocampus[0])
    image, geometry = hippocampus[1][0]
    scaled = dataclasses.replace(geometry, spacing=tuple(s * factor for s in geometry.spacing))
    lines = check_input(image, scaled, tr, "thick")
    assert any("spacing" in line and "far from the training data" in line for line in lines)
    assert not any("intensities" in line or "orientation" in line for line in lines)


def test_orientation_and_intensity(hippocampus):
    tr = TrainingRange.from_fingerprint(hippocampus[0])
    image, geometry = hippocampus[1][0]
    flipped = dataclasses.replace(geometry, direction=tuple(-v for v in geometry.direction))
    assert axis_codes(flipped.direction) not in tr.orientations
    assert [line for line in check_input(image, flipped, tr, "c") if "orientation" in line]
    brighter = image.astype(np.float64) * 20.0  # another scanner's intensity scale
    assert [line for line in check_input(brighter, geometry, tr, "c") if "intensities" in line]


def test_axis_codes_and_modalities():
    assert axis_codes((1, 0, 0, 0, 1, 0, 0, 0, 1)) == "LPS"
    assert axis_codes((-1, 0, 0, 0, -1, 0, 0, 0, 1)) == "RAS"
    assert axis_codes((0, 1, 1, 0)) == "PL"
    assert [channel_modality(n) for n in ("CT", "ct_venous", "MRI", "T2", "flair", "rgb")] == [
        "CT",
        "CT",
        "MR",
        "MR",
        "MR",
        "unknown",
    ]


def test_range_round_trip_and_old_fingerprint(hippocampus, tmp_path):
    fp = hippocampus[0]
    tr = TrainingRange.from_fingerprint(fp)
    tr.save(tmp_path / "range.json")
    assert TrainingRange.load(tmp_path / "range.json") == tr
    old = fp.to_dict()
    for case in old["cases"]:  # a fingerprint written before medseg recorded percentiles and direction
        del case["image_percentiles"], case["direction"]
    old_fp = Fingerprint.from_json(json.dumps(old))
    old_range = TrainingRange.from_fingerprint(old_fp)
    assert old_range.percentiles_min == () and old_range.orientations == ()
    image, geometry = hippocampus[1][0]
    assert check_input(image, geometry, old_range, "c") == []


def test_predict_folder_attaches_warnings_to_the_finished_case(tmp_path):
    image, _ = bright_box_image()
    write_oblique(tmp_path / "in" / "thick.nii.gz", image, spacing_zyx=(7.0, 0.8, 1.2))
    write_oblique(tmp_path / "in" / "fine.nii.gz", image, spacing_zyx=(3.0, 0.8, 1.2))
    seen = {}
    res = predict_folder(
        tmp_path / "in",
        tmp_path / "out",
        threshold_predictor(),
        progress=False,
        case_hook=lambda case: seen.setdefault(case.case_id, case.input_warnings),
    )
    assert res.ok and seen["fine"] == () and len(seen["thick"]) == 1
    assert seen["thick"][0].startswith("thick: spacing") and list(seen["thick"]) == res.warnings
