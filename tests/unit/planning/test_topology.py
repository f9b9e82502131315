"""Pooling/kernel topology from spacing and patch size, pinned to the values nnU-Net v2's rules give."""

from __future__ import annotations

import pytest

from medseg.planning.topology import compute_topology, round_up

S3 = (1, 1, 1)
P222 = (2, 2, 2)
P122 = (1, 2, 2)
K3 = (3, 3, 3)
K133 = (1, 3, 3)


def test_isotropic_hippocampus_median_shape_gives_three_poolings_per_axis():
    t = compute_topology((1.0, 1.0, 1.0), (36, 50, 35))
    assert t.patch_size == (40, 56, 40)
    assert t.strides == (S3, P222, P222, P222)
    assert t.kernel_sizes == (K3,) * 4
    assert t.num_pool_per_axis == (3, 3, 3)
    assert t.total_stride == (8, 8, 8)


def test_fractional_median_shape_is_rounded_up_to_the_total_stride():
    t = compute_topology((1.0, 1.0, 1.0), (35.5, 50.0, 35.0))
    assert t.patch_size == (40, 56, 40)


def test_anisotropic_thick_slices_pool_in_plane_first_with_in_plane_kernels():
    # 3 mm slices, 0.625 mm in plane: z is left alone until the in-plane spacing has caught up
    t = compute_topology((3.0, 0.625, 0.625), (20, 320, 256))
    assert t.patch_size == (20, 320, 256)
    assert t.strides == (S3, P122, P122, P222, P222, P122, P122)
    assert t.kernel_sizes == (K133, K133, K3, K3, K3, K3, K3)
    assert t.num_pool_per_axis == (2, 6, 6)


def test_five_mm_slices():
    t = compute_topology((5.0, 0.8, 0.8), (24, 256, 256))
    assert t.strides == (S3, P122, P122, P222, P222, P122, P122)
    assert t.kernel_sizes == (K133, K133, K3, K3, K3, K3, K3)
    assert t.patch_size == (24, 256, 256)


def test_coarse_axis_in_the_middle():
    t = compute_topology((0.9, 4.0, 0.9), (256, 28, 256))
    assert t.strides[1] == (2, 1, 2) and t.strides[2] == (2, 1, 2)
    assert t.kernel_sizes[0] == (3, 1, 3)
    assert t.kernel_sizes[2] == (3, 3, 3)
    assert t.patch_size[1] % t.total_stride[1] == 0


def test_2d_topology():
    t = compute_topology((1.0, 1.0), (50, 35))
    assert t.patch_size == (56, 40)
    assert t.strides == ((1, 1), (2, 2), (2, 2), (2, 2))
    big = compute_topology((0.8, 0.8), (512, 512))
    assert big.num_pool_per_axis == (7, 7)  # 512 / 2**7 = 4, the minimum feature map size
    assert big.patch_size == (512, 512)


def test_min_feature_map_size_and_single_axis_rule():
    # z is too short to pool at all; y alone may pool only while it keeps >= 3 * 4 voxels
    t = compute_topology((1.0, 1.0, 1.0), (6, 12, 7))
    assert t.num_pool_per_axis == (0, 1, 0)
    t = compute_topology((1.0, 1.0, 1.0), (6, 11, 7))
    assert t.num_pool_per_axis == (0, 0, 0)
    assert t.strides == (S3,) and t.kernel_sizes == (K3,)


def test_max_poolings_cap():
    t = compute_topology((1.0, 1.0, 1.0), (256, 256, 256), max_poolings=5)
    assert t.num_pool_per_axis == (5, 5, 5)
    assert compute_topology((1.0, 1.0, 1.0), (256, 256, 256)).num_pool_per_axis == (6, 6, 6)


def test_round_up_and_bad_input():
    assert round_up(40, 8) == 40 and round_up(33, 8) == 40 and round_up(35.5, 8) == 40
    with pytest.raises(ValueError):
        compute_topology((1.0, 1.0), (10, 10, 10))
    with pytest.raises(ValueError):
        compute_topology((0.0, 1.0, 1.0), (10, 10, 10))
