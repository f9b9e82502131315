"""``medseg card`` and the bundle's MODEL_CARD.md / training_range.json through the real CLI, and the input guard
of ``medseg predict`` on a bundle: a CT given to the (MR) model and a 4x finer spacing each warn in one line,
a case like the training data's does not."""

from __future__ import annotations

import json
import logging
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli.main import main
from tests.helpers import TINY_TRAIN, shrink_networks

pytestmark = pytest.mark.slow


def test_card_export_and_guard(tmp_path, synthetic_dataset, shared_data, capsys, caplog):
    work = tmp_path / "work"
    assert main(["plan", str(synthetic_dataset), "-o", str(work), "--num-workers", "1", "--configs", "3d_fullres"]) == 0
    shrink_networks(work)
    assert main(["train", str(work), "--fold", "0", *TINY_TRAIN, "-q"]) == 0
    capsys.readouterr()
    assert main(["card", str(work)]) == 0
    card = capsys.readouterr().out
    for heading in ("Dataset", "Plan", "Training", "Cross-validation", "Intended input range", "Known limits"):
        assert f"\n## {heading}\n" in card
    assert "MedsegSynthetic" in card and "6 training cases" in card and "3d_fullres/unet/fold_0" in card
    assert "| 3d_fullres/unet | 1 large |" in card  # per-class cross-validation Dice of the fold's validation
    assert "only 6 training cases" in card and "modality: MRI (MR)" in card
    assert main(["card", str(work)]) == 0 and capsys.readouterr().out == card  # deterministic

    bundle = tmp_path / "model.zip"
    assert main(["export", str(work), "-o", str(bundle), "-q"]) == 0
    with zipfile.ZipFile(bundle) as zf:
        assert {"MODEL_CARD.md", "training_range.json"} <= set(zf.namelist())
        assert json.loads(zf.read("training_range.json"))["channel_names"] == ["MRI"]
    capsys.readouterr()
    assert main(["card", str(bundle)]) == 0
    bundled = capsys.readouterr().out
    assert bundled.startswith("# Model card: MedsegSynthetic\n\nbundle networks: 3d_fullres/unet/fold_0\n")
    assert bundled.split("## Dataset", 1)[1] == card.split("## Dataset", 1)[1]

    images = tmp_path / "in"
    images.mkdir()
    source = sorted((synthetic_dataset / "imagesTr").glob("*.nii.gz"))[0]
    (images / "like_training.nii.gz").write_bytes(source.read_bytes())
    fine = sitk.ReadImage(str(source))
    fine.SetSpacing(tuple(s / 4 for s in fine.GetSpacing()))
    sitk.WriteImage(fine, str(images / "fine.nii.gz"))
    ct = sitk.ReadImage(str(shared_data / "totalseg_ct" / "imagesTr" / "example_ct_sm.nii.gz"))[0:30, 0:30, 0:10]
    sitk.WriteImage(ct, str(images / "ct.nii.gz"))
    caplog.set_level(logging.WARNING)
    assert main(["predict", "-i", str(images), "-o", str(tmp_path / "out"), "-m", str(bundle), "--device", "cpu"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.name == "medseg.inference.input_guard"]
    assert any(m.startswith("ct: channel 0 looks like a CT") for m in warned)
    assert any(m.startswith("fine: spacing") for m in warned)
    assert not [m for m in warned if m.startswith("like_training")]
    assert all("\n" not in m for m in warned)
    assert np.asarray(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "ct.nii.gz")))).shape == (10, 30, 30)


def test_card_refuses_a_missing_folder(tmp_path, capsys):
    assert main(["card", str(tmp_path / "nothing")]) != 0
    err = capsys.readouterr().err
    assert "no such work folder or bundle" in err and "Traceback" not in err


def test_card_shows_a_stored_fit(tmp_path, capsys):
    """The calibration / quality-score fit is shown when find-best stored one in postprocessing.json, else a line
    saying that predictions are uncalibrated."""
    from medseg.ensembling.model_card import model_card
    from medseg.io.synthetic import generate_synthetic_dataset

    work = tmp_path / "work"
    data = generate_synthetic_dataset(tmp_path / "data", num_cases=3, seed=1)
    assert main(["plan", str(data), "-o", str(work), "--num-workers", "1", "--configs", "3d_fullres", "-q"]) == 0
    before = model_card(work)
    assert "no calibration or quality-score fit" in before and "no trained runs" in before
    fit = {"temperature": 1.25, "ece_before": 0.08, "ece_after": 0.02, "num_cases": 3}
    (work / "postprocessing.json").write_text(json.dumps({"calibration": fit, "rules": {}}))
    after = model_card(work)
    assert '- calibration: `{"ece_after": 0.02, "ece_before": 0.08, "num_cases": 3, "temperature": 1.25}`' in after
    assert "no calibration or quality-score fit" not in after
