"""Every kind of dataset through the real CLI: plan, a short train, predict (issue 19).

Real data (copied from ``../shared/data``): totalseg_ct (117 gapped ids, flipped direction cosines),
totalseg_mr (one case), voxelmorph_brain (one case, 45 classes, 160x192x224). Synthetic look-alikes:
a 4-channel brain-tumour-like set with four sub-regions at random sides, and a 6.5 mm thick-slice set.
The plans are planned for real; their networks are then narrowed in ``plans.json`` (as a user may edit
it) so that a few training iterations and a sliding-window prediction take seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk

from medseg.cli.main import main
from tests.conftest import shared_dataset
from tests.helpers import TINY_TRAIN, assert_prediction_like_input, shrink_networks

pytestmark = pytest.mark.slow


def _plan(data: Path, work: Path) -> dict:
    assert main(["plan", str(data), "-o", str(work), "--device", "cpu", "--num-workers", "1", "-q"]) == 0
    shrink_networks(work, 4)
    return json.loads((work / "plans.json").read_text())


def _train(work: Path, fold: str, *extra: str) -> int:
    return main(["train", str(work), "--fold", fold, *TINY_TRAIN, "-q", *extra])


def _predict_and_check(work: Path, images: list[Path], out: Path, declared: set[int]) -> None:
    """Predict ``images`` (channel files of one or more cases) and check geometry and label ids."""
    inp = out.parent / f"{out.name}_in"
    inp.mkdir()
    for p in images:
        shutil.copy(p, inp / p.name)
    assert main(["predict", "-i", str(inp), "-o", str(out), "-m", str(work), "--device", "cpu", "--no-tta", "-q"]) == 0
    preds = sorted(out.glob("*.nii.gz"))
    cases = sorted({p.name.replace("_0000.nii.gz", ".nii.gz") for p in images if not _is_extra_channel(p)})
    assert [p.name for p in preds] == cases
    for pred in preds:
        src = inp / pred.name if (inp / pred.name).exists() else inp / pred.name.replace(".nii.gz", "_0000.nii.gz")
        assert_prediction_like_input(pred, src, declared)


def _is_extra_channel(p: Path) -> bool:
    stem = p.name[: -len(".nii.gz")]
    return len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit() and stem[-4:] != "0000"


def _declared(data: Path) -> set[int]:
    labels = json.loads((data / "dataset.json").read_text())["labels"]
    return {int(v) for v in labels.values()} if all(not str(k).isdigit() for k in labels) else {int(k) for k in labels}


def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(shared_dataset(name), dst)
    return dst


def test_totalseg_ct_gapped_ids_and_flipped_directions(tmp_path):
    data = _copy("totalseg_ct", tmp_path)
    plan = _plan(data, tmp_path / "work")
    assert len(plan["label_ids"]) == 118  # background + 117 declared, most absent
    assert _train(tmp_path / "work", "all") == 0
    images = sorted((data / "imagesTr").glob("*.nii.gz"))
    assert any(v < 0 for v in sitk.ReadImage(str(images[0])).GetDirection()[::4])  # flipped axes kept
    _predict_and_check(tmp_path / "work", images, tmp_path / "pred", _declared(data))


@pytest.mark.parametrize("name", ["totalseg_mr", "voxelmorph_brain"])
def test_single_case_datasets_train_on_all_and_refuse_fold_0(tmp_path, name, capsys):
    data = _copy(name, tmp_path)
    work = tmp_path / "work"
    _plan(data, work)
    capsys.readouterr()
    assert _train(work, "0") == 2
    err = capsys.readouterr().err
    assert "1 case(s) cannot be split into 5 cross-validation folds" in err and "--fold all" in err
    assert "Traceback" not in err
    assert not (work / "runs" / "3d_fullres" / "unet" / "fold_0" / "checkpoint_final.pt").exists()
    assert _train(work, "all", "--no-validation") == 0
    _predict_and_check(work, sorted((data / "imagesTr").glob("*.nii.gz")), tmp_path / "pred", _declared(data))


def test_tumour_like_multichannel_set_mirrors_every_axis_and_predicts(tmp_path):
    from medseg.io.synthetic_kinds import generate_tumour_dataset

    data = generate_tumour_dataset(tmp_path / "tumour", num_cases=6, shape=(40, 56, 56), num_channels=4)
    plan = _plan(data, tmp_path / "work")
    assert plan["channel_names"] == ["T1", "T1ce", "T2", "FLAIR"]
    for name, cfg in plan["configurations"].items():
        dims = len(cfg["networks"]["unet"]["patch_size"])
        assert cfg["mirror_axes"] == list(range(dims)), f"{name}: sub-regions have no fixed side"
    notes = plan["notes"]["configurations"]["3d_fullres"]["mirroring"]
    assert "not_mirrored" not in notes
    assert _train(tmp_path / "work", "0") == 0
    metrics = tmp_path / "work" / "runs" / "3d_fullres" / "unet" / "fold_0" / "validation" / "metrics.json"
    assert metrics.is_file()  # fold 0 validated on its held-out case(s)
    images = sorted((data / "imagesTr").glob("tumour_000_*.nii.gz"))
    assert len(images) == 4
    _predict_and_check(tmp_path / "work", images, tmp_path / "pred", _declared(data))


def test_anisotropic_set_keeps_the_coarse_axis(tmp_path):
    from medseg.io.synthetic_kinds import generate_anisotropic_dataset

    data = generate_anisotropic_dataset(tmp_path / "aniso", num_cases=5, shape=(12, 64, 64))
    plan = _plan(data, tmp_path / "work")
    cfg = plan["configurations"]["3d_fullres"]
    assert cfg["spacing"][0] == pytest.approx(6.5)  # no resampling of 6.5 mm slices to in-plane spacing
    assert cfg["networks"]["unet"]["spec"]["kernel_sizes"][0] == [1, 3, 3]  # in-plane convolutions first
    assert _train(tmp_path / "work", "0") == 0
    _predict_and_check(
        tmp_path / "work", sorted((data / "imagesTr").glob("case_00[01].nii.gz")), tmp_path / "pred", _declared(data)
    )
