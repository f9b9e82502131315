"""Per-structure statistics on hand-built label maps: volumes with anisotropic spacing, components counted
with full (26-) connectivity, world bounding boxes through flipped and oblique directions (checked against
SimpleITK's own index -> physical mapping), intensities, absent and undeclared labels."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.io.image import ImageGeometry
from medseg.postprocessing.structure_statistics import structure_statistics

SPACING = (3.0, 0.8, 1.2)  # (z, y, x) mm
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def geometry(shape=(8, 12, 10), direction=IDENTITY, origin=(5.0, -7.5, 2.25)) -> ImageGeometry:
    return ImageGeometry(shape, SPACING, origin, direction)


def sitk_box(labels: np.ndarray, geo: ImageGeometry, label: int) -> tuple[np.ndarray, np.ndarray]:
    """World box of every voxel corner of ``label``, through SimpleITK (independent of medseg's mapping)."""
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    geo.apply_to(image)
    corners = []
    for z, y, x in np.argwhere(labels == label):
        for dz, dy, dx in itertools.product((-0.5, 0.5), repeat=3):
            corners.append(image.TransformContinuousIndexToPhysicalPoint((x + dx, y + dy, z + dz)))
    points = np.array(corners)
    return points.min(0), points.max(0)


def test_volumes_components_and_boxes_with_anisotropic_spacing():
    geo = geometry()
    labels = np.zeros(geo.shape, np.uint8)
    labels[1:3, 2:5, 3:7] = 2  # 2 x 3 x 4 = 24 voxels
    labels[5, 9, 8] = 2  # a separate voxel
    labels[6, 10, 9] = 2  # touches the one above by a vertex only: same component with 26-connectivity
    labels[4:6, 0:2, 0:1] = 1  # 4 voxels
    voxel_ml = 3.0 * 0.8 * 1.2 / 1000
    rows = structure_statistics(labels, geo, (0, 1, 2, 3), {1: "kidney", 2: "tumour", 3: "cyst"})
    assert [(r.label, r.name) for r in rows] == [(1, "kidney"), (2, "tumour"), (3, "cyst")]
    one, two, three = rows
    assert (one.voxels, two.voxels, three.voxels) == (4, 26, 0)
    assert one.volume_ml == pytest.approx(4 * voxel_ml) and two.volume_ml == pytest.approx(26 * voxel_ml)
    assert (one.components, two.components, three.components) == (1, 2, 0)
    # identity direction: x from the x index, z from the z index; the box includes the voxels' faces
    ox, oy, oz = geo.origin
    assert one.bbox_min_mm == pytest.approx((ox - 0.6, oy - 0.4, oz + 4 * 3.0 - 1.5))
    assert one.bbox_max_mm == pytest.approx((ox + 0.6, oy + 1 * 0.8 + 0.4, oz + 5 * 3.0 + 1.5))
    assert one.bbox_size_mm == pytest.approx((1.2, 2 * 0.8, 2 * 3.0))
    lo, hi = sitk_box(labels, geo, 2)
    assert two.bbox_min_mm == pytest.approx(tuple(lo)) and two.bbox_max_mm == pytest.approx(tuple(hi))
    assert three.bbox_min_mm is None and three.bbox_size_mm is None and three.intensity_mean is None
    assert one.intensity_mean is None  # no image given


def test_a_flipped_and_an_oblique_direction_move_the_box_with_the_image():
    flipped = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    oblique = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    labels = np.zeros((8, 12, 10), np.int16)
    labels[2:6, 3:9, 1:4] = 1
    labels[7, 11, 9] = 1
    for direction in (flipped, oblique):
        geo = geometry(direction=direction)
        (row,) = structure_statistics(labels, geo, (0, 1))
        lo, hi = sitk_box(labels, geo, 1)
        assert row.bbox_min_mm == pytest.approx(tuple(lo)) and row.bbox_max_mm == pytest.approx(tuple(hi))
        assert row.components == 2 and row.voxels == 4 * 6 * 3 + 1
    # flipped x and z: the box lies on the other side of the origin along those axes
    (row,) = structure_statistics(labels, geometry(direction=flipped), (0, 1))
    assert row.bbox_max_mm[0] == pytest.approx(5.0 - 0.5 * 1.2) and row.bbox_min_mm[0] == pytest.approx(5.0 - 9.5 * 1.2)
    assert row.bbox_max_mm[2] == pytest.approx(2.25 - 1.5 * 3.0) and row.bbox_min_mm[2] == pytest.approx(
        2.25 - 7.5 * 3.0
    )
    assert row.bbox_min_mm[1] == pytest.approx(-7.5 + 2.5 * 0.8)  # y kept its direction


def test_intensity_mean_and_std_inside_each_structure():
    geo = geometry()
    labels = np.zeros(geo.shape, np.uint8)
    labels[0:2, 0:2, 0:2] = 1
    labels[4:8, 4:8, 4:8] = 4
    rng = np.random.default_rng(3)
    image = rng.normal(40.0, 25.0, geo.shape).astype(np.int16)  # HU-like integers
    rows = structure_statistics(labels, geo, (0, 1, 4), intensity=image)
    for row in rows:
        values = image[labels == row.label].astype(np.float64)
        assert row.intensity_mean == pytest.approx(values.mean())
        assert row.intensity_std == pytest.approx(values.std())
    image = np.full(geo.shape, -1000.0, np.float32)
    image[labels == 4] = 55.0
    assert structure_statistics(labels, geo, (0, 4), intensity=image)[1].intensity_mean == pytest.approx(55.0)
    assert structure_statistics(labels, geo, (0, 4), intensity=image)[1].intensity_std == pytest.approx(0.0)


def test_undeclared_ids_are_listed_and_2d_maps_use_8_connectivity():
    geo = ImageGeometry((6, 5), (0.5, 2.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    labels = np.zeros(geo.shape, np.uint8)
    labels[1, 1] = labels[2, 2] = 3  # diagonal neighbours: one component
    labels[5, 4] = 3
    rows = structure_statistics(labels, geo, (0, 1))
    assert [(r.label, r.name, r.voxels, r.components) for r in rows] == [(1, "label 1", 0, 0), (3, "label 3", 3, 2)]
    assert rows[1].volume_ml == pytest.approx(3 * 0.5 * 2.0 / 1000)
    assert rows[1].bbox_min_mm == pytest.approx((1 * 2.0 - 1.0, 1 * 0.5 - 0.25))
    assert rows[1].bbox_max_mm == pytest.approx((4 * 2.0 + 1.0, 5 * 0.5 + 0.25))


def test_bad_inputs_are_refused_clearly():
    geo = geometry()
    with pytest.raises(MedsegError, match="integer ids"):
        structure_statistics(np.zeros(geo.shape, np.float32), geo, (0, 1))
    with pytest.raises(MedsegError, match="shape"):
        structure_statistics(np.zeros((2, 2, 2), np.uint8), geo, (0, 1))
    with pytest.raises(MedsegError, match=">= 0"):
        structure_statistics(np.full(geo.shape, -1, np.int16), geo, (0, 1))
    with pytest.raises(MedsegError, match="image has shape"):
        structure_statistics(np.zeros(geo.shape, np.uint8), geo, (0, 1), intensity=np.zeros((1, 1, 1)))
