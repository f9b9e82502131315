"""A ``--fold all`` run (no cross-validation, no find-best) records the connected-component rules its
training labels support, and ``medseg predict`` applies them (``--no-postprocessing`` switches them off)."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli.main import main
from medseg.postprocessing import PRIOR_FILE, apply_postprocessing, load_rules
from medseg.postprocessing.operations import label_components
from tests.helpers import TINY_TRAIN

pytestmark = pytest.mark.slow


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_fold_all_run_records_the_rule_and_predict_applies_it(tmp_path, caplog):
    from medseg.io.synthetic import generate_synthetic_dataset

    data = generate_synthetic_dataset(tmp_path / "data", num_cases=10, seed=0)  # every structure one piece
    work = tmp_path / "work"
    assert main(["plan", str(data), "-o", str(work), "--num-workers", "1", "--device", "cpu"]) == 0
    assert main(["train", str(work), "--fold", "all", *TINY_TRAIN]) == 0
    run = work / "runs" / "3d_fullres" / "unet" / "fold_all"
    rules = load_rules(run / PRIOR_FILE)
    assert rules["source"] == "label_statistics" and rules["num_cases"] == 10
    assert rules["per_label"] == {str(k): [{"op": "largest_component"}] for k in (1, 2, 3)}
    assert all(rules["evidence"][str(k)]["single_component_cases"] == 10 for k in (1, 2, 3))

    images = tmp_path / "images"
    images.mkdir()
    for src in sorted((data / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(src, images / src.name)
    caplog.set_level(logging.INFO, logger="medseg")
    common = ["-i", str(images), "-m", str(work), "--device", "cpu", "--no-tta"]
    assert main(["predict", "-o", str(tmp_path / "post"), *common]) == 0
    assert f"from the label statistics of 10 training references ({run / PRIOR_FILE})" in caplog.text
    assert main(["predict", "-o", str(tmp_path / "raw"), "--no-postprocessing", *common]) == 0
    changed = False
    for src in sorted(images.glob("*.nii.gz")):
        post, raw = _read(tmp_path / "post" / src.name), _read(tmp_path / "raw" / src.name)
        np.testing.assert_array_equal(post, apply_postprocessing(raw, rules))
        for k in (1, 2, 3):  # at most one component per class (full connectivity, as the rule counts them)
            assert label_components(post == k)[1].size <= 2
        changed |= bool((post != raw).any())
    assert changed  # a network trained 2 iterations scatters hundreds of blobs per class: they were removed
    # find-best's rules, fitted on this ensemble, win over the label statistics
    (work / "postprocessing.json").write_text(
        json.dumps(
            {
                "format": "medseg-postprocessing-v1",
                "per_label": {},
                "fitted_on": {"members": [["3d_fullres", "unet"]], "num_cases": 5},
            }
        )
    )
    assert main(["predict", "-o", str(tmp_path / "fitted"), *common]) == 0
    for src in sorted(images.glob("*.nii.gz")):
        np.testing.assert_array_equal(_read(tmp_path / "fitted" / src.name), _read(tmp_path / "raw" / src.name))
