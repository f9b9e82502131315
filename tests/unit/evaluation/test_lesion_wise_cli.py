"""``medseg evaluate --lesion-wise`` through the real CLI on a real multi-component CT label map (totalseg_ct)."""

from __future__ import annotations

import csv
import json

import numpy as np
from scipy import ndimage

from medseg.cli.main import main
from medseg.evaluation import LESION_KEYS
from medseg.io.image import read_image, write_image
from tests.conftest import shared_dataset


def test_evaluate_lesion_wise_cli(tmp_path, capsys):
    ref_path = shared_dataset("totalseg_ct") / "labelsTr" / "example_ct_sm.nii.gz"
    ref, geo = read_image(ref_path)
    ref = ref.astype(np.uint8)
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    write_image(ref, geo, ref_dir / "example_ct_sm.nii.gz")
    counts = {int(v): ndimage.label(ref == v, structure=np.ones((3, 3, 3)))[1] for v in np.unique(ref) if v}
    labels = sorted(counts, key=lambda v: -counts[v])  # the class of most lesions first
    comps, n = ndimage.label(ref == labels[0], structure=np.ones((3, 3, 3)))
    assert n >= 3
    pred = ref.copy()
    pred[comps == int(np.argmin(np.bincount(comps.ravel())[1:])) + 1] = 0  # drop the smallest lesion of a class
    write_image(pred, geo, pred_dir / "example_ct_sm.nii.gz")

    out = tmp_path / "m.json"
    argv = ["evaluate", str(pred_dir), str(ref_dir), "-o", str(out), "--num-workers", "1", "--lesion-wise"]
    assert main(argv) == 0
    assert "lesion-wise (iou matching): " in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["lesion_wise_options"]["matching"] == "iou"
    first = res["cases"][0]["labels"][str(labels[0])]["lesion_wise"]
    assert list(first) == list(LESION_KEYS)
    assert first["fn"] == 1 and first["recall"] == (n - 1) / n and first["fp"] == 0
    assert first["precision"] == 1.0 and first["lesion_dice"] == first["recall"] and first["pq"] < 1.0
    for lab in labels[1:]:  # untouched classes are perfect
        lw = res["cases"][0]["labels"][str(lab)]["lesion_wise"]
        assert lw["fp"] == lw["fn"] == 0 and lw["pq"] == 1.0 and lw["lesion_hd95"] == 0.0
    assert list(res["mean"][str(labels[0])]["lesion_wise"]) == list(LESION_KEYS)
    assert res["foreground_mean"]["lesion_wise"]["fn"] == 1
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert rows[0]["lesion_tp"] != "" and "lesion_dice" in rows[0] and "lesion_pq" in rows[0]

    assert main([*argv, "--lesion-matching", "brats", "--min-lesion-volume", "0.001"]) == 0
    assert "lesion-wise (brats matching)" in capsys.readouterr().out
    brats = json.loads(out.read_text())
    assert (
        brats["lesion_wise_options"]["matching"] == "brats" and brats["lesion_wise_options"]["min_volume_ml"] == 0.001
    )
    assert brats["foreground_mean"]["lesion_wise"]["fn"] <= 1  # a dropped lesion near another counts as found

    assert main([*argv[:-1]]) == 0  # without --lesion-wise: no lesion-wise object (today's output)
    plain = json.loads(out.read_text())
    assert "lesion_wise" not in plain["cases"][0]["labels"][str(labels[0])] and "lesion_wise_options" not in plain
