"""predict_folder within a time budget per case: a tiny budget lowers TTA and overlap, the record says what
each case used, the geometry is unchanged, folds of an ensemble share the budget, and the default rule."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.errors import MedsegError
from medseg.inference import EnsembleMember, Predictor, predict_folder
from medseg.inference.folder import resolve_time_budget
from medseg.inference.prediction_record import RECORD_NAME
from medseg.inference.time_budget import CaseSetting
from medseg.io.image import read_channels

from .conftest import Threshold, bright_box_image, build_plan, conv_net, write_oblique

SPACING = (3.0, 0.8, 1.2)


class _Counting(torch.nn.Module):
    """A small conv net that counts the network inputs it sees."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = conv_net(seed=seed)
        self.inputs = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs += x.shape[0]
        return self.net(x)


def _predictor(n: int = 1, minutes: float | None = None, **kwargs) -> Predictor:
    plan = build_plan(spacings={"3d_fullres": SPACING}, median_spacing=SPACING)
    plan = dataclasses.replace(plan, time_budget_minutes=minutes)
    members = [EnsembleMember(_Counting(seed=i), plan, "3d_fullres", "unet") for i in range(n)]
    return Predictor(members, precision="fp32", batch_size=2, **kwargs)


@pytest.fixture
def input_dir(tmp_path):
    folder = tmp_path / "in"
    for i in range(2):
        image, _ = bright_box_image(shape=(14, 40, 36), seed=i)
        write_oblique(folder / f"case_{i}.nii.gz", image, spacing_zyx=SPACING, origin=(1.0 * i, -2.0, 3.5))
    return folder


def _record(out):
    return json.loads((out / RECORD_NAME).read_text())


def _inputs(predictor: Predictor) -> int:
    return sum(m.model.inputs for m in predictor.members)


def test_a_tiny_budget_drops_tta_then_overlap_and_the_record_says_so(input_dir, tmp_path):
    full, tiny = _predictor(), _predictor()
    res_full = predict_folder(input_dir, tmp_path / "full", full, progress=False, time_budget_per_case=1e6)
    res_tiny = predict_folder(input_dir, tmp_path / "tiny", tiny, progress=False, time_budget_per_case=1e-4)
    assert res_full.ok and res_tiny.ok
    rec_full, rec_tiny = _record(tmp_path / "full"), _record(tmp_path / "tiny")
    assert rec_tiny["time_budget_per_case"] == 0.0 and rec_tiny["rule"] == "given"
    assert [(o["tta_passes"], o["overlap"]) for o in rec_tiny["reduction_order"]] == [
        (8, 0.5),
        (4, 0.5),
        (2, 0.5),
        (1, 0.5),
        (1, 0.333),
        (1, 0.25),
        (1, 0.0),
    ]
    for case in ("case_0", "case_1"):
        f, t = rec_full["cases"][case], rec_tiny["cases"][case]
        assert (f["tta_passes"], f["overlap"], f["held"], f["reduced"]) == (8, 0.5, True, False)
        assert (t["tta_passes"], t["overlap"], t["held"], t["reduced"]) == (1, 0.0, False, True)
        assert t["full_tta_passes"] == 8 and t["estimated_seconds"] > 1e-4 and t["seconds"] > 0
        assert t["network_seconds"] > 0 and t["load_seconds"] > 0 and t["write_seconds"] > 0
    assert rec_tiny["cases"]["case_0"]["measure_seconds"] > 0  # measured once, on the first case
    assert rec_tiny["cases"]["case_1"]["measure_seconds"] < rec_tiny["cases"]["case_0"]["measure_seconds"]
    assert rec_tiny["summary"] == {
        "cases": 2,
        "mean_seconds": pytest.approx(rec_tiny["summary"]["mean_seconds"]),
        "held": 0,
        "reduced": 2,
    }
    # 14x40x36 voxels, patch 8x16x16: 3x4x4 windows at overlap 0.5, 2x3x3 at 0; the measurement 2 x 2 windows
    assert _inputs(full) == 2 * 8 * 48 + 4 and _inputs(tiny) == 2 * 18 + 4
    assert "held in 0 of 2 case(s)" in res_tiny.summary() and "TTA 1, overlap 0" in res_tiny.summary()
    for i in range(2):  # same geometry, both settings segment the same image
        src = sitk.ReadImage(str(input_dir / f"case_{i}.nii.gz"))
        for folder in ("full", "tiny"):
            seg = sitk.ReadImage(str(tmp_path / folder / f"case_{i}.nii.gz"))
            assert seg.GetSize() == src.GetSize() and seg.GetSpacing() == src.GetSpacing()
            assert seg.GetOrigin() == src.GetOrigin() and seg.GetDirection() == src.GetDirection()
    assert sorted(p.name for p in input_dir.iterdir()) == ["case_0.nii.gz", "case_1.nii.gz"]  # nothing beside input


def test_no_budget_predicts_as_before_and_still_records_what_was_used(input_dir, tmp_path):
    plain = _predictor()
    res = predict_folder(input_dir, tmp_path / "plain", plain, progress=False)
    assert res.ok and res.time_budget is None and "time budget" not in res.summary()
    rec = _record(tmp_path / "plain")
    assert rec["time_budget_per_case"] is None and rec["rule"] == "no limit"
    case = rec["cases"]["case_0"]
    assert (case["tta_passes"], case["overlap"], case["held"], case["estimated_seconds"]) == (8, 0.5, None, None)
    assert case["measure_seconds"] == 0.0 and _inputs(plain) == 2 * 8 * 48  # nothing measured
    # the full setting of a budget that fits is exactly the prediction without a budget
    predict_folder(input_dir, tmp_path / "fits", _predictor(), progress=False, time_budget_per_case=1e6)
    for i in range(2):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain" / f"case_{i}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "fits" / f"case_{i}.nii.gz")))
        np.testing.assert_array_equal(a, b)
    # a rerun that skips every case keeps the earlier record; one that redoes a case replaces its entry
    (tmp_path / "plain" / "case_1.nii.gz").unlink()
    predict_folder(input_dir, tmp_path / "plain", _predictor(), progress=False, time_budget_per_case=1e-4)
    rec = _record(tmp_path / "plain")
    assert rec["cases"]["case_0"]["tta_passes"] == 8 and rec["cases"]["case_1"]["tta_passes"] == 1


def test_folds_of_an_ensemble_share_the_budget_and_one_measurement(input_dir, tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(Predictor, "_measure_window", lambda self, i: measured.append(i) or 0.01)
    one, three = _predictor(1), _predictor(3)
    prepared = one.preprocess(*read_channels([input_dir / "case_0.nii.gz"]), "case_0")
    assert [(j.key, j.shape, j.max_passes) for j in one.case_jobs(prepared)] == [("3d_fullres/unet", (14, 40, 36), 8)]
    assert len(three.case_jobs(prepared)) == 3 and three.budget_options()[0] == CaseSetting(8, 0.5)
    # 48 windows x 8 passes x 0.01 s = 3.84 s fits 5 s for one network; three folds need 11.52 s at 8 passes,
    # 5.76 s at 4 and 2.88 s at 2 (the first case's estimate, before any correction by measured times)
    predict_folder(input_dir, tmp_path / "one", one, progress=False, time_budget_per_case=5.0)
    predict_folder(input_dir, tmp_path / "three", three, progress=False, time_budget_per_case=5.0)
    first_one = _record(tmp_path / "one")["cases"]["case_0"]
    first_three = _record(tmp_path / "three")["cases"]["case_0"]
    assert first_one["tta_passes"] == 8 and first_three["tta_passes"] == 2
    export = 0.2 + 14 * 40 * 36 * 2 * 1.2e-7
    assert first_three["estimated_seconds"] == pytest.approx(2.88 + first_three["load_seconds"] + export, abs=0.01)
    assert measured == [0, 0]  # once per predictor: the three folds are one network


def test_no_tta_and_a_larger_step_are_kept_as_the_fullest_setting():
    assert _predictor(use_tta=False).budget_options() == [
        CaseSetting(1, 0.5),
        CaseSetting(1, 0.666667),
        CaseSetting(1, 0.75),
        CaseSetting(1, 1.0),
    ]
    assert _predictor(step=0.75).budget_options()[0] == CaseSetting(8, 0.75)
    assert _predictor(tta_passes=2).budget_options()[:2] == [CaseSetting(2, 0.5), CaseSetting(1, 0.5)]


def test_default_budget_rule(tmp_path):
    assert resolve_time_budget("auto", _predictor(minutes=30)) == (
        pytest.approx(9.0),
        "default: 10% of the 30-minute training budget over 20 cases",
    )
    seconds, why = resolve_time_budget("auto", _predictor())
    assert seconds is None and "no training time budget" in why
    assert resolve_time_budget(None, _predictor(minutes=30)) == (None, "no limit")
    assert resolve_time_budget(4, _predictor()) == (4.0, "given")
    with pytest.raises(MedsegError, match="positive number"):
        resolve_time_budget(0, _predictor())


def test_a_cascade_counts_its_previous_stage_into_the_budget(input_dir, tmp_path):
    from .test_cascade_predictor import CASCADE, FromPreviousStage
    from .test_cascade_predictor import _plan as cascade_plan

    plan = cascade_plan()
    lowres = Predictor([EnsembleMember(Threshold(), plan, "3d_lowres", "unet")], precision="fp32")
    cascade = Predictor(
        [EnsembleMember(FromPreviousStage(), plan, CASCADE, "unet")],
        precision="fp32",
        previous_stages={"3d_lowres": lowres},
    )
    prepared = cascade.preprocess(*read_channels([input_dir / "case_0.nii.gz"]), "case_0")
    assert sorted(j.key for j in cascade.case_jobs(prepared)) == [f"{CASCADE}/unet", "3d_lowres/unet"]
    res = predict_folder(input_dir, tmp_path / "out", cascade, progress=False, time_budget_per_case=1e-4)
    assert res.ok and set(_record(tmp_path / "out")["cases"]) == {"case_0", "case_1"}
    assert {(r.tta_passes, r.overlap) for r in res.records.values()} == {(1, 0.0)}
    assert set(lowres._window_seconds) == {"3d_lowres/unet"} and set(cascade._window_seconds) == {f"{CASCADE}/unet"}
