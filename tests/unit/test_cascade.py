"""The cascade (medseg.preprocessing/training.previous_stage): planned iff 3d_lowres is, its input channels, the previous stage's
segmentation mapped onto the cascade grid and one-hot, the refusal to train before every lowres fold has its
cross-validated predictions, and intensity augmentation leaving the previous-stage channels alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import ConfigError, MedsegError, PlanError
from medseg.io.image import ImageGeometry, write_image
from medseg.planning.plan import ConfigurationPlan, NormalizationSpec, Plan
from medseg.planning.stage import Stage
from medseg.preprocessing import labels_to_classes, preprocess_case, preprocessed_folder, write_case
from medseg.preprocessing.previous_stage import append_previous_stage, onehot_previous_stage, to_preprocessed_grid
from medseg.training.previous_stage import load_network_input, prepare_previous_stage, previous_stage_folder
from tests.helpers import network_plan

from .planning.conftest import BRATS, LIVERLIKE
from .planning.conftest import plan as plan_fingerprint

CASCADE = "3d_cascade_fullres"


def _plan(label_ids=(0, 1, 2)) -> Plan:
    net = network_plan("unet", (8, 8, 8), 2, ((3, 3, 3),) * 2, ((1, 1, 1), (2, 2, 2)), base_features=4, max_features=8)
    norm = (NormalizationSpec("zscore"),)

    def cfg(name, spacing, previous=None, ident=None):
        return ConfigurationPlan(
            name, 3, spacing, (10, 12, 12), norm, {"unet": net}, data_identifier=ident or name, previous_stage=previous
        )

    configs = {
        "3d_fullres": cfg("3d_fullres", (2.0, 0.8, 0.8)),
        "3d_lowres": cfg("3d_lowres", (4.0, 1.6, 1.6)),
        CASCADE: cfg(CASCADE, (2.0, 0.8, 0.8), "3d_lowres", "3d_fullres"),
    }
    return Plan(
        "t", ("MRI",), tuple(label_ids), tuple(f"l{i}" for i in label_ids), (3.0, 1.0, 1.0), (8, 14, 14), configs
    ).validate()


def _case(seed: int) -> tuple[np.ndarray, np.ndarray, ImageGeometry]:
    """An anisotropic image (zero border, so cropping matters) and its label ids 0, 1, 2."""
    rng = np.random.default_rng(seed)
    shape = (8, 14, 14)
    image = np.zeros((1, *shape), dtype=np.float32)
    image[0, 1:7, 2:12, 3:13] = rng.uniform(1, 2, (6, 10, 10))
    label = np.zeros(shape, dtype=np.uint8)
    label[2:6, 4:10, 4:9] = 1
    label[3:5, 5:8, 9:12] = 2
    geometry = ImageGeometry(shape, (3.0, 1.0, 1.0), (1.0, -2.0, 5.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    return image, label, geometry


# ----------------------------------------------------------------------------------------------- planning
def test_cascade_is_planned_exactly_when_lowres_is():
    p = plan_fingerprint(*LIVERLIKE)
    full, cascade = p.configuration("3d_fullres"), p.configuration(CASCADE)
    assert "3d_lowres" in p.configurations and cascade.previous_stage == "3d_lowres"
    assert (cascade.spacing, cascade.patch_size, cascade.networks, cascade.data_identifier) == (
        full.spacing,
        full.patch_size,
        full.networks,
        full.data_identifier,
    )  # same cache, same networks
    assert p.network_in_channels(CASCADE) == p.num_channels + len(p.label_ids) - 1
    assert p.network_in_channels("3d_fullres") == p.network_in_channels("3d_lowres") == p.num_channels
    assert "3d_lowres" in p.notes["configurations"][CASCADE]["rule"]
    assert Plan.from_json(p.to_json()).configuration(CASCADE).previous_stage == "3d_lowres"
    brats = plan_fingerprint(*BRATS)
    assert "3d_lowres" not in brats.configurations and CASCADE not in brats.configurations


@pytest.mark.parametrize(
    "previous, message",
    [
        ("3d_cascade_fullres", "another configuration"),
        ("3d_midres", "another configuration"),
    ],
)
def test_inconsistent_previous_stage_is_refused(previous, message):
    d = _plan().to_dict()
    d["configurations"][CASCADE]["previous_stage"] = previous
    with pytest.raises(PlanError, match=message):
        Plan.from_dict(d)


def test_chained_cascade_is_refused():
    d = _plan().to_dict()
    d["configurations"]["3d_lowres"]["previous_stage"] = "3d_fullres"
    with pytest.raises(PlanError, match="itself a cascade"):
        Plan.from_dict(d)


# ----------------------------------------------------------------------------------------------- arrays
def test_onehot_has_one_channel_per_foreground_class():
    classes = np.array([[[0, 1, 2, 3]]], dtype=np.int8)  # 3 = an ignore class: no channel
    onehot = onehot_previous_stage(classes, 2)
    assert onehot.shape == (2, 1, 1, 4) and onehot.dtype == np.float32
    np.testing.assert_array_equal(onehot[:, 0, 0], [[0, 1, 0, 0], [0, 0, 1, 0]])
    data = np.ones((1, 1, 1, 4), dtype=np.float32)
    stacked = append_previous_stage(data, classes, _plan())
    assert stacked.shape == (3, 1, 1, 4) and np.array_equal(stacked[1:], onehot)
    with pytest.raises(MedsegError, match="same grid"):
        append_previous_stage(data, classes[..., :3], _plan())


def test_segmentation_maps_onto_the_grid_like_preprocessing_maps_the_label():
    plan = _plan()
    image, label, geometry = _case(0)
    data, seg, props = preprocess_case(image, geometry, label, plan, CASCADE, "c0")
    assert tuple(props.shape_after_resample) != tuple(props.shape_after_crop)  # cropped and resampled
    mapped = to_preprocessed_grid(labels_to_classes(label, plan.label_ids), props)
    assert mapped.shape == data.shape[1:]
    np.testing.assert_array_equal(mapped, seg)
    with pytest.raises(MedsegError, match="shape"):
        to_preprocessed_grid(label[:-1], props)


# ----------------------------------------------------------------------------------------------- training input
def _work(tmp_path: Path) -> tuple[Path, Plan, list[str]]:
    plan = _plan()
    work = tmp_path / "work"
    plan.save(work / "plans.json")
    ids = [f"c{i}" for i in range(4)]
    for i, cid in enumerate(ids):
        image, label, geometry = _case(i)
        data, seg, props = preprocess_case(image, geometry, label, plan, CASCADE, cid)
        write_case(preprocessed_folder(work, plan, CASCADE), data, seg, props)
    (work / "splits.json").write_text(
        json.dumps([{"train": ids[2:], "val": ids[:2]}, {"train": ids[:2], "val": ids[2:]}])
    )
    return work, plan, ids


def _write_fold_predictions(work: Path, fold: int, ids: list[str], value: int | None = None) -> None:
    for cid in ids:
        _, label, geometry = _case(int(cid[1:]))
        if value is not None:
            label = np.full_like(label, value)
        write_image(
            label, geometry, work / "runs" / "3d_lowres" / "unet" / f"fold_{fold}" / "validation" / f"{cid}.nii.gz"
        )


def test_training_is_refused_until_every_lowres_fold_has_predicted(tmp_path):
    work, plan, ids = _work(tmp_path)
    with pytest.raises(ConfigError) as err:
        prepare_previous_stage(work, Stage.resolve(plan, CASCADE, "unet"), ids)
    msg = str(err.value)
    for fold in (0, 1):
        assert (
            f"3d_lowres fold {fold}" in msg
            and f"medseg train {work} --config 3d_lowres --arch unet --fold {fold}" in msg
        )
    _write_fold_predictions(work, 0, ids[:2])
    with pytest.raises(ConfigError) as err:
        prepare_previous_stage(work, Stage.resolve(plan, CASCADE, "unet"), ids)
    assert "fold 1 (c2, c3)" in str(err.value) and "fold 0" not in str(err.value)
    assert not previous_stage_folder(work, plan, CASCADE).exists()

    _write_fold_predictions(work, 1, ids[2:])
    folder = prepare_previous_stage(work, Stage.resolve(plan, CASCADE, "unet"), ids)
    assert sorted(p.name for p in folder.glob("*.npz")) == [f"{c}.npz" for c in ids]
    data, seg, _ = load_network_input(work, plan, CASCADE, "c3")
    assert data.shape[0] == plan.network_in_channels(CASCADE) == 3
    np.testing.assert_array_equal(data[1], (seg == 1).astype(np.float32))  # the CV prediction equals the label here
    np.testing.assert_array_equal(data[2], (seg == 2).astype(np.float32))

    # a retrained fold's new prediction is mapped again; the others are kept
    before = (folder / "c0.npz").stat().st_mtime_ns
    _write_fold_predictions(work, 1, ["c3"], value=1)
    prepare_previous_stage(work, Stage.resolve(plan, CASCADE, "unet"), ids)
    assert (folder / "c0.npz").stat().st_mtime_ns == before
    data, _, _ = load_network_input(work, plan, CASCADE, "c3")
    assert data[1].all() and not data[2].any()


def test_intensity_augmentation_leaves_the_previous_stage_channels_alone():
    from medseg.training.config import AugmentationConfig
    from medseg.training.data import CaseData, PatchSampler

    rng = np.random.default_rng(0)
    seg = (rng.random((12, 12, 12)) > 0.5).astype(np.int8)
    data = np.concatenate([rng.normal(size=(1, 12, 12, 12)).astype(np.float32), onehot_previous_stage(seg, 1)])
    case = CaseData("c", data, seg, {1: np.argwhere(seg == 1)})
    aug = AugmentationConfig(
        p_rotation=0.0,
        p_scale=0.0,
        p_elastic=0.0,
        mirror_axes=(0, 1, 2),
        p_noise=1.0,
        p_blur=1.0,
        p_brightness=1.0,
        p_contrast=1.0,
        p_gamma=1.0,
        previous_stage_perturbation=False,
    )
    sampler = PatchSampler([case], (8, 8, 8), 2, augmentation=aug, image_channels=1)
    x, y = sampler.batch(0)
    assert x.shape == (2, 2, 8, 8, 8)
    np.testing.assert_array_equal(x[:, 1].numpy(), (y == 1).numpy().astype(np.float32))  # moved with the labels
    assert not np.isin(x[:, 0].numpy(), [0.0, 1.0]).all()
