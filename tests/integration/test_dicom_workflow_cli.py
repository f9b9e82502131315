"""A new user's whole DICOM path through the real CLI: DICOM series with SEG annotations -> ``medseg convert`` ->
``plan`` -> ``train`` -> ``predict --output-format dicom-seg --statistics --preview`` on other DICOM series; the
SEGs medseg writes are read back with highdicom and hold exactly the NIfTI label maps it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from medseg.cli.main import main
from medseg.io.dicom_seg_writer import write_dicom_seg
from tests.helpers import shrink_networks
from tests.unit.io._dicom_builders import write_slice

pytestmark = pytest.mark.slow

SHAPE = (8, 24, 24)  # slices, rows, columns
SLICE_MM = 2.5


def _patient(folder: Path, patient: str, seed: int) -> tuple[list[Path], np.ndarray]:
    """One CT series with a bright ball (the structure) on noise; returns its files (ascending z) and labels."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    centre = (SHAPE[0] / 2 + rng.uniform(-1, 1), 12 + rng.uniform(-3, 3), 12 + rng.uniform(-3, 3))
    radius = rng.uniform(4.0, 6.0)
    # physical distance: slices are 2.5x the 0.8 mm pixels of the template (close enough for a ball)
    ball = ((z - centre[0]) * 3) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius**2
    stored = (rng.normal(900, 40, SHAPE) + 300 * ball).astype(np.int16)
    uid, files = generate_uid(), []
    for k in range(SHAPE[0]):
        path = folder / patient / f"im{k:02d}.dcm"
        write_slice(path, stored[k], (-10.0, 20.0, SLICE_MM * k), uid, instance=k + 1, patient=patient)
        files.append(path)
    return files, ball.astype(np.uint8)


def test_dicom_series_to_trained_model_to_seg(tmp_path, capsys):
    annotated = tmp_path / "annotated"
    for i in range(6):
        files, labels = _patient(annotated, f"TRAIN{i}", seed=i)
        write_dicom_seg(labels, files, {1: "liver"}, annotated / f"TRAIN{i}_seg.dcm", model_id="reference")
    data, work = tmp_path / "dataset", tmp_path / "work"
    assert main(["convert", str(annotated), "-o", str(data)]) == 0
    assert json.loads((data / "dataset.json").read_text())["labels"] == {"background": 0, "liver": 1}
    assert len(list((data / "labelsTr").glob("*.nii.gz"))) == 6
    assert main(["plan", str(data), "-o", str(work), "--num-workers", "1", "--configs", "3d_fullres", "-q"]) == 0
    shrink_networks(work)
    train = ["--epochs", "2", "--iters-per-epoch", "15", "--device", "cpu", "--num-workers", "0", "--no-validation"]
    assert main(["train", str(work), "--fold", "all", *train]) == 0

    new = tmp_path / "new_scans"
    truth = {}
    for i in range(2):
        _, truth[f"NEW{i}"] = _patient(new, f"NEW{i}", seed=100 + i)
    out = tmp_path / "out"
    capsys.readouterr()
    outputs = ["--output-format", "dicom-seg", "--statistics", "--preview", "--device", "cpu"]
    assert main(["predict", "-i", str(new), "-o", str(out), "-m", str(work), *outputs]) == 0
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert len(written) == 2, capsys.readouterr()
    for nifti in sorted(out.glob("*.nii.gz")):
        case = nifti.name[: -len(".nii.gz")]
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(nifti)))
        patient = case.split("_")[0]
        dice = 2 * ((labels == 1) & (truth[patient] == 1)).sum() / ((labels == 1).sum() + truth[patient].sum())
        assert dice > 0.5, f"{case}: Dice {dice:.3f}"  # a bright ball on noise: a few steps learn it
        seg = hd.seg.segread(out / f"{case}_seg.dcm")
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver"]
        assert seg.SeriesInstanceUID != seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        frames = {
            str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for f in seg.PerFrameFunctionalGroupsSequence
        }
        assert len(frames) == int((labels == 1).any(axis=(1, 2)).sum())  # one frame per slice holding the liver
        assert (out / "previews" / f"{case}.png").is_file()
    statistics = json.loads((out / "statistics.json").read_text())["cases"]
    assert len(statistics) == 2
    hu = [s["intensity_mean"] for c in statistics.values() for s in c["structures"] if s["label"] == 1]
    assert all(100 < m < 250 for m in hu), hu  # the ball is stored at ~1200, HU = stored - 1024 (the rescale)
