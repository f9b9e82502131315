"""`medseg predict --output-format nifti|dicom-seg|rtstruct`: NIfTI by default; a DICOM format builds the
DICOM writer hook, and refuses input that is not a DICOM series before any model is loaded."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

import medseg.ensembling
import medseg.inference
from medseg.cli import predict as commands
from medseg.cli.main import main
from medseg.inference import PredictionResult
from medseg.inference.dicom_output import DicomOutputWriter
from medseg.options import OutputFormat
from medseg.postprocessing import QualityWriter


def _capture(monkeypatch) -> tuple[list[dict], list[tuple]]:
    seen: list[dict] = []
    loaded: list[tuple] = []
    monkeypatch.setattr(medseg.ensembling, "work_dir_predictor", lambda *a, **k: loaded.append(a) or object())
    monkeypatch.setattr(
        medseg.inference,
        "predict_folder",
        lambda inp, out, predictor, **kwargs: seen.append(kwargs) or PredictionResult(out),
    )
    return seen, loaded


@pytest.mark.parametrize("output_format", ["dicom-seg", "rtstruct"])
def test_dicom_output_needs_dicom_input(tmp_path, monkeypatch, capsys, output_format):
    seen, loaded = _capture(monkeypatch)
    (tmp_path / "case_0000.nii.gz").touch()  # an image file: not a DICOM series
    base = ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(tmp_path), "--device", "cpu"]
    assert main([*base, "--output-format", output_format]) == 2
    err = capsys.readouterr().err
    assert f"--output-format {output_format} needs DICOM input series" in err and "Traceback" not in err
    assert not seen and not loaded  # refused before loading a model
    assert main(base) == 0 and main([*base, "--output-format", "nifti"]) == 0
    assert [type(s["case_hook"]) for s in seen] == [QualityWriter, QualityWriter]  # quality.json only, no DICOM
    with pytest.raises(SystemExit):
        main([*base, "--output-format", "dicom"])


def test_dicom_writer_carries_the_model_labels_and_identity(tmp_path):
    plan = SimpleNamespace(
        dataset_name="Dataset7_Liver", label_ids=(0, 1, 2), label_names=("background", "liver", "tumour")
    )
    predictor = SimpleNamespace(plan=plan, describe=lambda: "2 x 3d_fullres/unet")
    args = argparse.Namespace(output_format="dicom-seg", model=str(tmp_path / "work"))
    writer = commands._dicom_writer(args, predictor)
    assert isinstance(writer, DicomOutputWriter) and writer.output_format == OutputFormat.DICOM_SEG
    assert writer.label_names == {1: "liver", 2: "tumour"}
    assert writer.model_id == "Dataset7_Liver 2 x 3d_fullres/unet (work)"
    assert writer.source_files is None  # each DICOM case brings its series (FinishedCase.source_series)
    assert commands._dicom_writer(argparse.Namespace(output_format="nifti"), predictor) is None
