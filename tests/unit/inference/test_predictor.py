"""Predictor on in-memory arrays: geometry kept, label ids mapped back, ensembles averaged."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.errors import MedsegError
from medseg.inference import EnsembleMember, Predictor
from medseg.io.image import ImageGeometry
from medseg.postprocessing.operations import RulesPostprocess

from .conftest import OBLIQUE, Threshold, bright_box_image, build_plan, conv_net, write_oblique


def test_threshold_model_segments_box_with_gapped_label_ids():
    plan = build_plan(label_ids=(0, 117), spacings={"3d_fullres": (3.0, 0.8, 1.2)})
    image, box = bright_box_image()
    predictor = Predictor([EnsembleMember(Threshold(), plan, "3d_fullres", "unet")], precision="fp32")
    seg = predictor.predict_array(image, (3.0, 0.8, 1.2))
    assert seg.shape == image.shape and seg.dtype == np.uint8
    assert set(np.unique(seg)) == {0, 117}
    np.testing.assert_array_equal(seg == 117, box)


@pytest.mark.parametrize("target_spacing", [(3.0, 0.8, 1.2), (2.0, 1.0, 1.0)])
def test_predict_sitk_keeps_oblique_anisotropic_geometry(tmp_path, target_spacing):
    plan = build_plan(spacings={"3d_fullres": target_spacing})
    image, box = bright_box_image()
    src = write_oblique(tmp_path / "img.nii.gz", image)
    read = sitk.ReadImage(str(tmp_path / "img.nii.gz"))
    predictor = Predictor([EnsembleMember(Threshold(), plan, "3d_fullres", "unet")], use_tta=False)
    out = predictor.predict_sitk(read)
    assert out.GetSize() == src.GetSize()
    assert out.GetSpacing() == read.GetSpacing()
    assert out.GetOrigin() == read.GetOrigin()
    assert out.GetDirection() == read.GetDirection()
    np.testing.assert_allclose(out.GetDirection(), OBLIQUE, atol=1e-6)
    seg = sitk.GetArrayFromImage(out)
    dice = 2 * np.sum((seg == 1) & box) / (np.sum(seg == 1) + box.sum())
    assert dice > (0.999 if target_spacing == (3.0, 0.8, 1.2) else 0.85)


def test_ensemble_of_identical_models_equals_single_model():
    plan = build_plan()
    image, _ = bright_box_image(seed=1)
    geo = ImageGeometry(image.shape, (3.0, 1.0, 1.2), (0.0, 0.0, 0.0), OBLIQUE)
    net = conv_net()
    single = Predictor([EnsembleMember(net, plan, "3d_fullres", "unet")])
    double = Predictor(
        [
            EnsembleMember(net, plan, "3d_fullres", "unet"),
            EnsembleMember(copy.deepcopy(net), plan, "3d_fullres", "unet"),
        ]
    )
    p1 = single.predict_probabilities(image[None], geo)
    p2 = double.predict_probabilities(image[None], geo)
    assert p1.shape == (2, *image.shape)
    np.testing.assert_allclose(p1.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(p1, p2, atol=1e-6)


def test_mixed_configuration_ensemble_is_mean_of_members():
    plan = build_plan(spacings={"3d_fullres": (3.0, 1.0, 1.2), "2d": (3.0, 0.7, 0.9)})
    image, _ = bright_box_image(seed=2)
    geo = ImageGeometry(image.shape, (3.0, 1.0, 1.2), (1.0, 2.0, 3.0), OBLIQUE)
    m3 = EnsembleMember(conv_net(3, seed=1), plan, "3d_fullres", "unet")
    m2 = EnsembleMember(conv_net(2, seed=2), plan, "2d", "unet")
    both = Predictor([m3, m2]).predict_probabilities(image[None], geo)
    p3 = Predictor([m3]).predict_probabilities(image[None], geo)
    p2 = Predictor([m2]).predict_probabilities(image[None], geo)
    assert p2.shape == p3.shape == both.shape == (2, *image.shape)
    np.testing.assert_allclose(both, (p2 + p3) / 2, atol=1e-5)
    assert np.abs(p2 - p3).max() > 0.05  # the two members really differ
    with pytest.raises(MedsegError, match="mixes configurations"):
        Predictor([m3, m2]).predict_preprocessed(np.zeros((1, 8, 16, 16), np.float32))


def test_postprocessing_is_applied():
    plan = build_plan()
    image, box = bright_box_image()
    image[8:10, 20:23, 16:19] += 100.0  # spurious bright spot -> predicted as a second component
    rules = {"format": "medseg-postprocessing-v1", "per_label": {"1": [{"op": "largest_component"}]}}
    member = EnsembleMember(Threshold(), plan, "3d_fullres", "unet")
    raw = Predictor([member]).predict_array(image, (3.0, 1.0, 1.2))
    post = Predictor([member], postprocess=RulesPostprocess(rules)).predict_array(image, (3.0, 1.0, 1.2))
    assert raw[8:10, 20:23, 16:19].all() and not post[8:10, 20:23, 16:19].any()
    np.testing.assert_array_equal(post == 1, box)


def test_members_must_agree():
    a = EnsembleMember(Threshold(), build_plan(label_ids=(0, 1)), "3d_fullres", "unet")
    b = EnsembleMember(Threshold(), build_plan(label_ids=(0, 2)), "3d_fullres", "unet")
    with pytest.raises(MedsegError, match="disagree"):
        Predictor([a, b])
    with pytest.raises(MedsegError, match="at least one"):
        Predictor([])
    with pytest.raises(MedsegError, match="channel"):
        Predictor([a]).predict_array(np.zeros((2, 4, 4, 4)), (1, 1, 1))


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    import torch

    def broken_compile(model, **kwargs):
        def run(x):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    plan = build_plan()
    image, box = bright_box_image()
    predictor = Predictor([EnsembleMember(Threshold(), plan, "3d_fullres", "unet")], compile=True, use_tta=False)
    seg = predictor.predict_array(image, (3.0, 1.0, 1.2))
    np.testing.assert_array_equal(seg == 1, box)
    assert "torch.compile failed" in caplog.text


def test_streamed_argmax_equals_argmax_of_mean_probabilities():
    plan = build_plan(spacings={"3d_fullres": (3.0, 1.0, 1.2), "2d": (3.0, 0.7, 0.9)}, label_ids=(0, 1, 4))
    image, _ = bright_box_image(seed=3)
    image[:, :3] = 0  # zero frame -> cropped away, must come back as background
    image[:, :, -2:] = 0
    geo = ImageGeometry(image.shape, (3.0, 1.0, 1.2), (0.0, 0.0, 0.0), OBLIQUE)
    predictor = Predictor(
        [
            EnsembleMember(conv_net(3, classes=3, seed=4), plan, "3d_fullres", "unet"),
            EnsembleMember(conv_net(3, classes=3, seed=5), plan, "3d_fullres", "unet"),
            EnsembleMember(conv_net(2, classes=3, seed=6), plan, "2d", "unet"),
        ]
    )
    inferred = predictor._infer(predictor.preprocess(image[None], geo))
    probs = predictor._combine(inferred)
    streamed = predictor._combine_labels(inferred)
    full = probs.argmax(0)
    assert len(np.unique(full)) == 3  # a non-trivial map
    np.testing.assert_array_equal(streamed, full)
    assert (full[:, :3] == 0).all() and (full[:, :, -2:] == 0).all()
    labels = predictor.predict_array(image, geo)
    np.testing.assert_array_equal(labels, np.array([0, 1, 4])[full])


class _FlipRecorder(torch.nn.Module):
    """Records every input it sees; predicts class 1 where the input is bright (flip-equivariant)."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return torch.cat([torch.zeros_like(x[:, :1]), 10.0 * x[:, :1]], 1)


@pytest.mark.parametrize("mirror_axes, passes", [(None, 8), ((2,), 2), ((), 1)])
def test_tta_flips_only_the_planned_mirror_axes(mirror_axes, passes):
    plan = build_plan(spacings={"3d_fullres": (3.0, 1.0, 1.2)})
    cfg = dataclasses.replace(plan.configuration("3d_fullres"), mirror_axes=mirror_axes)
    plan = dataclasses.replace(plan, configurations={"3d_fullres": cfg}).validate()
    image, box = bright_box_image(shape=(8, 16, 16))
    image[0, 0, 0] = 400.0  # a corner marker: each flip moves it to another corner
    net = _FlipRecorder()
    predictor = Predictor([EnsembleMember(net, plan, "3d_fullres", "unet")], precision="fp32", batch_size=1)
    seg = predictor.predict_array(image, (3.0, 1.0, 1.2))
    assert len(net.inputs) == passes
    corners = set()
    for x in net.inputs:
        arr = x[0, 0]
        idx = np.unravel_index(int(torch.argmax(arr)), arr.shape)
        corners.add(tuple(int(i != 0) for i in idx))
    flipped = {a for c in corners for a, f in enumerate(c) if f}
    assert flipped == set(cfg.resolved_mirror_axes())
    np.testing.assert_array_equal(seg == 1, box | (image > 300))


def test_tta_adds_grid_shifts_when_the_plan_mirrors_fewer_axes():
    plan = build_plan()
    cfg = plan.configuration("3d_fullres")
    net = cfg.network("unet")
    spec = dataclasses.replace(
        net.spec, kernel_sizes=((3, 3, 3),) * 4, strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2))
    )  # total stride (4, 8, 8)
    net = dataclasses.replace(net, spec=spec)
    cfg = dataclasses.replace(cfg, mirror_axes=(2,), networks={"unet": net})
    plan = dataclasses.replace(plan, configurations={"3d_fullres": cfg}).validate()
    for shape, patches in (((6, 12, 12), 1), ((8, 16, 16), 8)):
        image, box = bright_box_image(shape=shape)
        recorder = _FlipRecorder()
        predictor = Predictor([EnsembleMember(recorder, plan, "3d_fullres", "unet")], precision="fp32", batch_size=1)
        seg = predictor.predict_array(image, (3.0, 1.0, 1.2))
        # 2 flips x 2 shifts (Z by 1, Y and X by 2 voxels); shifted by padding, an image as large as the
        # (8, 16, 16) patch outgrows it and needs 2 x 2 x 2 patches
        assert len(recorder.inputs) == 2 * 2 * patches
        np.testing.assert_array_equal(seg == 1, box)
    no_tta = Predictor(
        [EnsembleMember(_FlipRecorder(), plan, "3d_fullres", "unet")], precision="fp32", batch_size=1, use_tta=False
    )
    no_tta.predict_array(image, (3.0, 1.0, 1.2))
    assert len(no_tta.members[0].model.inputs) == 1


def test_cpu_inference_batch_shrinks_for_large_many_class_patches():
    import torch

    from medseg.inference.predictor import inference_batch_size

    cpu = torch.device("cpu")
    assert inference_batch_size((40, 56, 40), 32, 3, cpu) == 4  # small patch: the largest batch
    assert inference_batch_size((128, 112, 96), 32, 46, cpu) == 1  # 45 classes, GPU-sized patch
    assert inference_batch_size((64, 48, 96), 16, 46, cpu) == 4
    assert inference_batch_size((192, 160), 32, 3, cpu) == 8
    assert inference_batch_size((128, 112, 96), 32, 46, torch.device("cuda")) == 2
