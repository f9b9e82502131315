"""Augmentation: geometry of the resampling, label consistency, intensity transforms, determinism."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from medseg.training.augmentation import SpatialParams, draw_spatial, extract_patch, rotation_matrix
from medseg.training.config import AugmentationConfig
from medseg.training.intensity_augmentation import IntensityParams, apply_intensity, draw_intensity, gaussian_blur


def _volume(shape=(10, 14, 12), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((2, *shape)).astype(np.float32)
    seg = np.zeros(shape, np.int8)
    seg[3:7, 4:9, 2:6] = 1
    seg[5:9, 9:12, 6:11] = 2
    return image, seg


def test_identity_matrix_resampling_equals_plain_crop():
    image, seg = _volume()
    center = np.array([4.5, 6.5, 5.5])
    plain_img, plain_lab = extract_patch(image, seg, SpatialParams(center=center), (6, 8, 8))
    img, lab = extract_patch(image, seg, SpatialParams(center=center, matrix=np.eye(3)), (6, 8, 8))
    assert plain_img.shape == (2, 6, 8, 8) and plain_lab.shape == (6, 8, 8)
    assert torch.allclose(img, plain_img, atol=1e-5)
    assert torch.equal(lab.long(), plain_lab.long())
    # the plain crop is exactly the array slice around the centre
    assert np.array_equal(plain_img.numpy(), image[:, 2:8, 3:11, 2:10])


def test_crop_outside_the_image_is_zero_padded_and_mirroring_flips():
    image, seg = _volume()
    img, lab = extract_patch(image, seg, SpatialParams(center=np.array([0.5, 0.5, 0.5])), (4, 4, 4))
    assert torch.all(img[:, :1] == 0) and torch.all(img[:, :, :1] == 0)
    assert np.array_equal(img[:, 1:, 1:, 1:].numpy(), image[:, :3, :3, :3])
    center = np.array([4.5, 6.5, 5.5])
    flipped, flab = extract_patch(image, seg, SpatialParams(center=center, flips=(0, 2)), (6, 8, 8))
    plain, plab = extract_patch(image, seg, SpatialParams(center=center), (6, 8, 8))
    assert torch.equal(flipped, plain.flip(1).flip(3))
    assert torch.equal(flab, plab.flip(0).flip(2))
    # a mirror expressed as a matrix resamples to the same patch
    m = np.diag([-1.0, 1.0, -1.0])
    mimg, mlab = extract_patch(image, seg, SpatialParams(center=center, matrix=m), (6, 8, 8))
    assert torch.allclose(mimg, flipped, atol=1e-5) and torch.equal(mlab, flab)


def test_quarter_turn_in_2d_matches_rot90():
    rng = np.random.default_rng(1)
    image = rng.standard_normal((1, 9, 9)).astype(np.float32)
    seg = (rng.random((9, 9)) > 0.5).astype(np.int8)
    center = np.array([4.0, 4.0])
    r = rotation_matrix([math.pi / 2])
    img, lab = extract_patch(image, seg, SpatialParams(center=center, matrix=r), (9, 9))
    # output (i, j) samples input centre + R (i - 4, j - 4) = (4 - (j - 4), 4 + (i - 4))
    expected = np.array([[image[0, 8 - j, i] for j in range(9)] for i in range(9)])
    assert np.allclose(img[0].numpy(), expected, atol=1e-5)
    assert np.array_equal(lab.numpy(), np.array([[seg[8 - j, i] for j in range(9)] for i in range(9)]))


def test_zoom_enlarges_structures_and_labels_stay_valid():
    image, seg = _volume((20, 20, 20))
    seg[:] = 0
    seg[8:12, 8:12, 8:12] = 1  # 4^3 cube around the centre 9.5
    center = np.array([9.5, 9.5, 9.5])
    _, lab = extract_patch(image, seg, SpatialParams(center=center, matrix=np.eye(3) / 2.0), (16, 16, 16))
    assert int((lab == 1).sum()) == 8**3  # zoom 2: the cube is twice as large along each axis
    aug = AugmentationConfig(p_rotation=1.0, p_scale=1.0, p_elastic=1.0)
    image, seg = _volume()
    for seed in range(5):
        params = draw_spatial(np.random.default_rng(seed), np.array([5.0, 7.0, 6.0]), aug, 3, anisotropic=False)
        assert params.matrix is not None and params.elastic_seed is not None
        img, lab = extract_patch(image, seg, params, (8, 8, 8))
        assert img.shape == (2, 8, 8, 8) and lab.shape == (8, 8, 8)
        assert set(torch.unique(lab).tolist()) <= {0, 1, 2}
        assert torch.isfinite(img).all()


def test_anisotropic_rotation_is_in_plane_only():
    aug = AugmentationConfig(p_rotation=1.0, p_scale=0.0)
    params = draw_spatial(np.random.default_rng(3), np.zeros(3), aug, 3, anisotropic=True)
    m = params.matrix
    assert np.allclose(m[0], [m[0, 0], 0, 0]) and np.allclose(m[:, 0], [m[0, 0], 0, 0])  # Z axis untouched
    assert abs(abs(m[0, 0]) - 1) < 1e-12


def _params(b, **kw):
    base = dict(
        noise_std=[None] * b,
        blur_sigma=[None] * b,
        brightness=[1.0] * b,
        contrast=[None] * b,
        lowres_zoom=[None] * b,
        gamma=[None] * b,
        gamma_inverted=[None] * b,
        noise_seed=list(range(b)),
    )
    base.update(kw)
    return IntensityParams(**base)


def test_intensity_transforms():
    torch.manual_seed(0)
    batch = torch.randn(3, 1, 6, 8, 8) + 2.0
    orig = batch.clone()
    apply_intensity(batch, _params(3, brightness=[1.0, 1.5, 1.0]))
    assert torch.equal(batch[0], orig[0]) and torch.allclose(batch[1], orig[1] * 1.5)

    batch = orig.clone()
    apply_intensity(batch, _params(3, contrast=[None, 1.3, None]))
    assert batch[1].min() >= orig[1].min() - 1e-6 and batch[1].max() <= orig[1].max() + 1e-6
    assert batch[1].std() > orig[1].std()  # more contrast (clipped to the range)

    batch = orig.clone()
    apply_intensity(batch, _params(3, gamma=[(0.7, False), None, None], gamma_inverted=[None, 1.4, None]))
    for i in (0, 1):
        assert batch[i].mean().item() == pytest.approx(orig[i].mean().item(), abs=1e-4)
        assert batch[i].std().item() == pytest.approx(orig[i].std().item(), rel=1e-4)
        assert not torch.allclose(batch[i], orig[i])
    assert torch.equal(batch[2], orig[2])

    batch = orig.clone()
    apply_intensity(batch, _params(3, noise_std=[None, None, 0.5], lowres_zoom=[0.5, None, None]))
    assert torch.equal(batch[1], orig[1])
    assert (batch[2] - orig[2]).std().item() == pytest.approx(0.5, rel=0.15)
    assert not torch.equal(batch[0], orig[0])


def test_intensity_switch_suppresses_every_intensity_draw():
    rngs = [np.random.default_rng(i) for i in range(8)]
    always = AugmentationConfig(p_noise=1.0, p_blur=1.0, p_brightness=1.0, p_contrast=1.0, p_lowres=1.0, p_gamma=1.0)
    drawn = draw_intensity(rngs, always, 3)
    assert drawn is not None and all(s is not None for s in drawn.noise_std)
    assert draw_intensity(rngs, dataclasses.replace(always, intensity=True), 3) is not None
    assert draw_intensity(rngs, dataclasses.replace(always, intensity=False), 3) is None
    assert draw_intensity(rngs, dataclasses.replace(always, enabled=False), 3) is None


def test_gaussian_blur_keeps_constant_and_smooths_impulse():
    x = torch.full((1, 9, 9, 9), 3.0)
    assert torch.allclose(gaussian_blur(x, [1.0, 1.0, 1.0]), x, atol=1e-5)
    imp = torch.zeros(1, 15, 15)
    imp[0, 7, 7] = 1.0
    out = gaussian_blur(imp, [1.0, 1.0])
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert out[0, 7, 7] < 0.2 and out[0, 7, 8] == pytest.approx(out[0, 8, 7].item())


def test_previous_stage_perturbation_changes_masks_but_stays_one_hot_and_is_seeded():
    from medseg.training.augmentation import perturb_previous_stage

    base = torch.zeros((2, 12, 16, 16))
    base[0, 3:9, 4:12, 4:12] = 1.0
    base[1, 2:4, 2:4, 2:4] = 1.0
    base[1, 8:10, 10:13, 10:13] = 1.0  # two components
    changed = 0
    for seed in range(40):
        x = base.clone()
        perturb_previous_stage(x, np.random.default_rng(seed))
        assert set(torch.unique(x).tolist()) <= {0.0, 1.0}
        changed += int(not torch.equal(x, base))
        y = base.clone()
        perturb_previous_stage(y, np.random.default_rng(seed))
        assert torch.equal(x, y)
    # P(channel untouched) = 0.6 * 0.8 = 0.48, so both untouched in about 23 % of samples
    assert 15 <= changed <= 40


def test_sampler_perturbs_only_the_previous_stage_channels():
    from medseg.training.config import AugmentationConfig
    from medseg.training.data import CaseData, PatchSampler

    rng = np.random.default_rng(0)
    seg = np.zeros((12, 20, 20), np.int8)
    seg[3:9, 5:15, 5:15] = 1
    image = rng.standard_normal((1, 12, 20, 20)).astype(np.float32)
    data = np.concatenate([image, (seg == 1)[None].astype(np.float32)])
    case = CaseData("c", data, seg, {1: np.argwhere(seg == 1)})
    aug = AugmentationConfig(p_rotation=0.0, p_scale=0.0, p_elastic=0.0, mirror_axes=(), intensity=False)
    plain = PatchSampler([case], (12, 20, 20), 2, 0.0, aug, seed=1, image_channels=2)
    cascade = PatchSampler([case], (12, 20, 20), 2, 0.0, aug, seed=1, image_channels=1)
    differs = 0
    for it in range(10):
        xa, _ = plain.batch(it)
        xb, _ = cascade.batch(it)
        assert torch.equal(xa[:, 0], xb[:, 0])  # the image channel is untouched
        differs += int(not torch.equal(xa[:, 1], xb[:, 1]))
    assert differs > 0
