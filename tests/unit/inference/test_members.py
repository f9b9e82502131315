"""Ensemble members: checkpoints -> networks (run folders), work-folder defaults, find-best choice, errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from medseg.ensembling import work_dir_predictor
from medseg.errors import CheckpointError, MedsegError
from medseg.inference import Predictor, predict_folder
from medseg.io.checkpoint import save_checkpoint

from .conftest import bright_box_image, build_plan, write_oblique


def _tiny_plan():
    plan = build_plan(spacings={"3d_fullres": (3.0, 0.8, 1.2)}, median_spacing=(3.0, 0.8, 1.2))
    cfg = plan.configuration("3d_fullres")
    net = cfg.network("unet")
    net = dataclasses.replace(net, spec=dataclasses.replace(net.spec, base_features=4, max_features=8))
    return dataclasses.replace(plan, configurations={"3d_fullres": dataclasses.replace(cfg, networks={"unet": net})})


def _train_fake_run(work, plan, fold, seed):
    net = plan.configuration("3d_fullres").network("unet")
    torch.manual_seed(seed)
    model = net.build(plan.num_channels, plan.num_classes)
    run = work / "runs" / "3d_fullres" / "unet" / f"fold_{fold}"
    run.mkdir(parents=True)
    save_checkpoint(
        {
            "model": model.state_dict(),
            "epoch": 1,
            "iteration": 10,
            "train_config": {},
            "plan": plan.to_dict(),
            "configuration": "3d_fullres",
            "arch": "unet",
        },
        run / "checkpoint_final.pt",
    )
    return model


@pytest.fixture
def work(tmp_path):
    plan = _tiny_plan()
    work = tmp_path / "work"
    work.mkdir()
    plan.save(work / "plans.json")
    for fold in (0, 1):
        _train_fake_run(work, plan, fold, seed=fold)
    return work


def test_default_is_every_trained_fold_and_weights_are_restored(work):
    pred = work_dir_predictor(work)
    assert len(pred.members) == 2 and pred.describe() == "2 x 3d_fullres/unet"
    ref = _train_fake_run(work / "other", _tiny_plan(), 1, seed=1).eval()
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(pred.members[1].model(x), ref(x))
    assert len(work_dir_predictor(work, folds=[1]).members) == 1
    with pytest.raises(MedsegError, match="fold_3"):
        work_dir_predictor(work, folds=[3])
    with pytest.raises(MedsegError, match="not planned"):
        work_dir_predictor(work, archs=["psp"])


def test_best_json_and_matching_postprocessing_are_used(work):
    (work / "best.json").write_text(
        json.dumps({"members": [{"configuration": "3d_fullres", "arch": "unet"}], "folds": [1]})
    )
    rules = {
        "format": "medseg-postprocessing-v1",
        "per_label": {"1": [{"op": "largest_component"}]},
        "fitted_on": {"members": [["3d_fullres", "unet"]]},
    }
    (work / "postprocessing.json").write_text(json.dumps(rules))
    pred = work_dir_predictor(work)
    assert len(pred.members) == 1 and pred.members[0].source.endswith("fold_1/checkpoint_final.pt")
    assert pred.postprocess.rules["per_label"] == rules["per_label"]
    assert work_dir_predictor(work, postprocessing=False).postprocess is None
    rules["fitted_on"]["members"] = [["2d", "unet"]]
    (work / "postprocessing.json").write_text(json.dumps(rules))
    assert work_dir_predictor(work).postprocess is None  # fitted on another ensemble


def _single_component_fingerprint(path, num_cases=12):
    from medseg.fingerprint import CaseFingerprint, Fingerprint

    cases = tuple(
        CaseFingerprint(f"c{i}", (3.0, 0.8, 1.2), (10, 24, 20), (10, 24, 20), 1.0, {1: 100}, {1: (100,)})
        for i in range(num_cases)
    )
    Fingerprint("test", ("ch0",), (0, 1), cases, ()).save(path)


def test_without_find_best_the_label_statistics_rules_apply_and_find_best_wins(work, caplog):
    from medseg.postprocessing.prior import PRIOR_FILE, record_prior

    _single_component_fingerprint(work / "fingerprint.json")
    caplog.set_level("INFO", logger="medseg")
    pred = work_dir_predictor(work)  # no record in the runs: decided from the fingerprint
    assert pred.postprocess.rules["source"] == "label_statistics"
    assert pred.postprocess.rules["per_label"] == {"1": [{"op": "largest_component"}]}
    assert "label 1: largest_component (from the label statistics of all 12 references" in caplog.text
    seg = np.zeros((10, 24, 20), np.uint8)
    seg[2:6, 3:12, 3:12], seg[8, 20, 17] = 1, 1  # a stray voxel far from the structure
    out = pred.indices_to_labels(seg, (3.0, 0.8, 1.2))
    assert out[8, 20, 17] == 0 and out.sum() == seg.sum() - 1
    assert work_dir_predictor(work, postprocessing=False).postprocess is None
    # recorded in the runs at the end of training: the records are used
    for fold in (0, 1):
        record_prior(work, work / "runs" / "3d_fullres" / "unet" / f"fold_{fold}", [f"c{i}" for i in range(10)])
    caplog.clear()
    assert work_dir_predictor(work).postprocess.rules["num_cases"] == 10
    assert f"2 runs' {PRIOR_FILE}" in caplog.text
    # find-best's rules fitted on this ensemble win, even when they remove nothing
    (work / "postprocessing.json").write_text(
        json.dumps(
            {"format": "medseg-postprocessing-v1", "per_label": {}, "fitted_on": {"members": [["3d_fullres", "unet"]]}}
        )
    )
    assert work_dir_predictor(work).postprocess.rules["per_label"] == {}
    assert "source" not in work_dir_predictor(work).postprocess.rules


def test_nothing_trained_and_bad_checkpoints(work, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _tiny_plan().save(empty / "plans.json")
    with pytest.raises(MedsegError, match="no trained model"):
        work_dir_predictor(empty)
    (work / "runs" / "3d_fullres" / "unet" / "fold_0" / "checkpoint_final.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="fold_0"):
        work_dir_predictor(work)
    with pytest.raises(CheckpointError, match="not found"):
        Predictor.from_run_dir(work / "runs" / "3d_fullres" / "unet" / "fold_1", checkpoint="best")


def test_run_folder_alone_predicts_a_folder(work, tmp_path):
    image, _ = bright_box_image()
    write_oblique(tmp_path / "in" / "a.nii.gz", image)
    pred = Predictor.from_run_dir(work / "runs" / "3d_fullres" / "unet" / "fold_0", use_tta=False)
    res = predict_folder(tmp_path / "in", tmp_path / "out", pred, progress=False)
    assert res.ok and (tmp_path / "out" / "a.nii.gz").is_file()
    single = pred.predict_probabilities(image[None], pred_geometry(tmp_path / "in" / "a.nii.gz"))
    assert np.allclose(single.sum(0), 1.0, atol=1e-5)


def pred_geometry(path):
    from medseg.io.image import read_image

    return read_image(path)[1]
