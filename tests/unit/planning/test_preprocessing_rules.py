"""The preprocessing rules: target spacing (anisotropy rule) and normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.fingerprint import IntensityStats
from medseg.planning.preprocessing_rules import determine_target_spacing

from .conftest import HIPPO_LIKE, PROSTATE, plan


# ----------------------------------------------------------------------------------------------- spacing rule
def test_target_spacing_is_the_median_for_isotropic_data():
    sp = np.array([(1.0, 1.0, 1.0), (1.2, 0.9, 0.9), (0.8, 1.1, 1.1)])
    target, notes = determine_target_spacing(sp, np.full((3, 3), 100.0))
    assert target == (1.0, 1.0, 1.0)
    assert notes["anisotropic_spacing"] is False


def test_anisotropic_short_axis_uses_its_10th_percentile():
    z = np.array([3.0, 3.6, 3.6, 4.0, 3.0, 3.6, 4.0, 3.6, 5.0, 2.5])
    sp = np.stack([z, np.full(10, 0.7), np.full(10, 0.7)], 1)
    shapes = np.tile([20.0, 320.0, 320.0], (10, 1))
    target, notes = determine_target_spacing(sp, shapes)
    assert target[0] == pytest.approx(np.percentile(z, 10)) == pytest.approx(2.95)
    assert target[1:] == (0.7, 0.7)
    assert "10th percentile" in notes["anisotropy_rule"]


def test_anisotropic_but_long_axis_keeps_the_median():
    z = np.array([3.0, 3.6, 4.0, 5.0])
    sp = np.stack([z, np.full(4, 0.7), np.full(4, 0.7)], 1)
    shapes = np.tile([200.0, 320.0, 320.0], (4, 1))  # 200 * 3 >= 320: not short
    target, _ = determine_target_spacing(sp, shapes)
    assert target[0] == pytest.approx(3.8)


def test_anisotropic_percentile_never_goes_below_the_other_axes():
    z = np.array([0.5, 0.5] + [5.0] * 8)  # 10th percentile 0.5 mm, finer than the 0.8 mm in plane
    sp = np.stack([z, np.full(10, 0.8), np.full(10, 0.8)], 1)
    target, _ = determine_target_spacing(sp, np.tile([20.0, 512.0, 512.0], (10, 1)))
    assert target[0] == pytest.approx(0.8 + 1e-5)


# ----------------------------------------------------------------------------------------------- normalisation
def test_ct_normalisation_uses_foreground_statistics():
    st = IntensityStats(40.0, 120.0, 35.0, -1024.0, 3000.0, -950.0, 1400.0, 5000)
    p = plan(*HIPPO_LIKE, channel_names=("CT",), intensity=st)
    for cfg in p.configurations.values():
        (n,) = cfg.normalization
        assert (n.scheme, n.clip_low, n.clip_high, n.mean, n.std) == ("ct", -950.0, 1400.0, 40.0, 120.0)
        assert n.use_nonzero_mask is False


def test_mri_normalisation_and_nonzero_mask_rule():
    uncropped = plan(*HIPPO_LIKE, channel_names=("MRI",), relative=0.9)
    (n,) = uncropped.configuration().normalization
    assert n.scheme == "zscore" and n.use_nonzero_mask is False
    cropped = plan(*HIPPO_LIKE, channel_names=("T2",), relative=0.5)
    (n,) = cropped.configuration().normalization
    assert n.scheme == "zscore" and n.use_nonzero_mask is True
    both = plan(*HIPPO_LIKE, channel_names=("ct", "noNorm"), relative=0.5)
    schemes = [(n.scheme, n.use_nonzero_mask) for n in both.configuration().normalization]
    assert schemes == [("ct", False), ("none", False)]


def test_2d_and_3d_fullres_share_preprocessed_data():
    p = plan(*PROSTATE)
    assert p.configuration("2d").data_identifier == p.configuration("3d_fullres").data_identifier
