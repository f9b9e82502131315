"""A ``--fold all`` run (no find-best, no quality fit) still judges the volumes in ``quality.json``: ``medseg
predict`` takes the training volumes from the work folder's fingerprint (per-label z-scores and the joint rule)."""

from __future__ import annotations

import json
import shutil

import pytest

from medseg.cli.main import main
from medseg.io.workdir import WorkDir
from tests.helpers import TINY_TRAIN

pytestmark = pytest.mark.slow


def test_fold_all_predict_judges_volumes_from_the_fingerprint(tmp_path):
    from medseg.io.synthetic import generate_synthetic_dataset

    data = generate_synthetic_dataset(tmp_path / "data", num_cases=10, seed=0)  # 3 labels, in every case
    work = tmp_path / "work"
    assert main(["plan", str(data), "-o", str(work), "--num-workers", "1", "--device", "cpu"]) == 0
    assert main(["train", str(work), "--fold", "all", *TINY_TRAIN]) == 0
    assert not WorkDir(work).postprocessing.exists()  # no find-best: no quality fit
    images = tmp_path / "images"
    images.mkdir()
    for src in sorted((data / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(src, images / src.name)
    out = tmp_path / "out"
    assert main(["predict", "-i", str(images), "-o", str(out), "-m", str(work), "--device", "cpu", "--no-tta"]) == 0
    doc = json.loads((out / "quality.json").read_text())
    assert doc["score_model"]["source"] == "heuristic" and len(doc["cases"]) == 2
    for entry in doc["cases"].values():
        assert sorted(entry["labels"]) == ["1", "2", "3"]
        present = [label for label, f in entry["labels"].items() if f["voxels"]]
        for label, f in entry["labels"].items():
            if f["voxels"]:
                assert isinstance(f["volume_z"], float)
            else:  # the training volumes also say the label is expected
                assert any(r.startswith(f"label {label}") and "is missing" in r for r in entry["reasons"])
        distance = entry["volume_distance"]
        if len(present) >= 2:
            assert distance["labels"] == present and distance["threshold"] > 0
            flagged = any(r.startswith("label volumes jointly unlike") for r in entry["reasons"])
            assert flagged == (distance["mahalanobis2"] > distance["threshold"])
        else:
            assert distance is None
        assert entry["verdict"] == ("review" if entry["reasons"] else "ok")
