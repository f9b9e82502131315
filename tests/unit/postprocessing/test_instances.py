"""Instance maps on hand-built masks: components per class, connectivity, the watershed split of touching
objects, the table in world coordinates and the probability score."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.io.image import ImageGeometry
from medseg.postprocessing import InstanceOptions, find_instances
from medseg.postprocessing.instances import index_to_world

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _geometry(shape, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=IDENTITY) -> ImageGeometry:
    return ImageGeometry(tuple(shape), tuple(spacing), tuple(origin), tuple(direction))


def _two_touching_spheres(spacing=(1.0, 1.0, 1.0), radius_mm=8.0, gap_mm=15.0):
    """Two balls of ``radius_mm`` whose centres are ``gap_mm`` apart along x (overlapping: one component)."""
    shape = (int(40 / spacing[0]), int(40 / spacing[1]), int(60 / spacing[2]))
    z, y, x = (np.indices(shape).astype(float) * np.reshape(spacing, (3, 1, 1, 1)))[:]
    centres = [(20.0, 20.0, 18.0), (20.0, 20.0, 18.0 + gap_mm)]
    balls = [(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= radius_mm**2 for c in centres]
    return balls[0] | balls[1], balls, _geometry(shape, spacing)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 1.0)])
def test_touching_spheres_are_one_component_but_two_instances_when_split(spacing):
    mask, balls, geometry = _two_touching_spheres(spacing)
    labels = mask.astype(np.uint8) * 3
    ids, table = find_instances(labels, geometry)
    assert len(table) == 1 and set(np.unique(ids)) == {0, 1}
    assert table[0].label == 3 and table[0].voxels == int(mask.sum())

    ids, table = find_instances(labels, geometry, InstanceOptions(split_touching=True))
    assert [i.id for i in table] == [1, 2] and [i.label for i in table] == [3, 3]
    np.testing.assert_array_equal(ids > 0, mask)  # every voxel kept, nothing added
    assert sum(i.voxels for i in table) == int(mask.sum())
    for ball in balls:  # each part is (nearly) one ball: the ball's own voxels carry one id
        own = ball & ~(balls[0] & balls[1])
        values, counts = np.unique(ids[own], return_counts=True)
        assert counts.max() / counts.sum() > 0.97
    xs = sorted(i.centroid_mm[0] for i in table)
    assert xs == pytest.approx([18.0, 33.0], abs=1.0)

    # seeds closer than the minimum separation: not split
    _, table = find_instances(labels, geometry, InstanceOptions(split_touching=True, min_separation_mm=20.0))
    assert len(table) == 1


def test_a_tube_is_not_split_into_pieces():
    z, y, x = np.indices((20, 20, 60))
    tube = ((z - 10) ** 2 + (y - 10) ** 2 <= 16) & (x > 3) & (x < 56)
    _, table = find_instances(
        tube.astype(np.uint8), _geometry(tube.shape), InstanceOptions(split_touching=True, min_separation_mm=5.0)
    )
    assert len(table) == 1


def test_connectivity_decides_whether_diagonal_neighbours_are_one_object():
    vertex = np.zeros((8, 8, 8), np.uint8)
    vertex[1:3, 1:3, 1:3] = 1
    vertex[3:5, 3:5, 3:5] = 1  # touches the first cube at one corner
    edge = np.zeros((8, 8, 8), np.uint8)
    edge[1:3, 1:3, 1:3] = 1
    edge[1:3, 3:5, 3:5] = 1  # shares an edge with the first cube
    counts = {
        (name, c): len(find_instances(m, _geometry(m.shape), InstanceOptions(connectivity=c))[1])
        for name, m in (("vertex", vertex), ("edge", edge))
        for c in (1, 2, 3)
    }
    assert counts == {
        ("vertex", 1): 2,
        ("vertex", 2): 2,
        ("vertex", 3): 1,
        ("edge", 1): 2,
        ("edge", 2): 1,
        ("edge", 3): 1,
    }
    with pytest.raises(MedsegError, match="connectivity"):
        InstanceOptions(connectivity=4)


def test_classes_get_consecutive_ids_and_keep_their_label_ids():
    labels = np.zeros((6, 10, 10), np.uint8)
    labels[1:3, 1:3, 1:3] = 7
    labels[1:3, 6:8, 6:8] = 7
    labels[4:6, 1:4, 5:9] = 2
    ids, table = find_instances(labels, _geometry(labels.shape, spacing=(2.0, 0.5, 0.5)))
    assert [(i.id, i.label, i.voxels) for i in table] == [(1, 2, 24), (2, 7, 8), (3, 7, 8)]
    assert ids.dtype == np.uint16 and ids.shape == labels.shape
    for inst in table:
        assert set(np.unique(labels[ids == inst.id])) == {inst.label}
        assert inst.volume_ml == pytest.approx(inst.voxels * 2.0 * 0.5 * 0.5 / 1000.0)
        assert inst.score is None


def test_centroid_and_box_are_world_coordinates_with_a_flipped_direction_and_an_origin():
    direction = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # x and z flipped
    spacing_zyx, origin = (3.0, 0.5, 2.0), (100.0, -20.0, 7.5)
    labels = np.zeros((6, 12, 10), np.uint8)
    labels[1:4, 2:5, 3:9] = 1  # z 1..3, y 2..4, x 3..8
    ids, (inst,) = find_instances(labels, _geometry(labels.shape, spacing_zyx, origin, direction))
    # by hand: world x = 100 - 2.0 * i, y = -20 + 0.5 * j, z = 7.5 - 3.0 * k
    assert inst.centroid_mm == pytest.approx((100 - 2.0 * 5.5, -20 + 0.5 * 3, 7.5 - 3.0 * 2))
    assert inst.bbox_min_mm == pytest.approx((100 - 2.0 * 8, -20 + 0.5 * 2, 7.5 - 3.0 * 3))
    assert inst.bbox_max_mm == pytest.approx((100 - 2.0 * 3, -20 + 0.5 * 4, 7.5 - 3.0 * 1))

    # the same as SimpleITK's physical points, for an oblique direction too
    theta = 0.3
    oblique = (np.cos(theta), -np.sin(theta), 0.0, np.sin(theta), np.cos(theta), 0.0, 0.0, 0.0, 1.0)
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing(tuple(reversed(spacing_zyx)))
    image.SetOrigin(origin)
    image.SetDirection(oblique)
    geometry = ImageGeometry.from_sitk(image)
    index = np.array([[1.0, 2.0, 3.0], [2.5, 11.0, 0.25]])
    expected = [image.TransformContinuousIndexToPhysicalPoint(tuple(reversed(i.tolist()))) for i in index]
    np.testing.assert_allclose(index_to_world(index, geometry), expected, atol=1e-9)
    _, (inst,) = find_instances(labels, geometry)
    zz, yy, xx = np.nonzero(labels)
    points = np.array([image.TransformIndexToPhysicalPoint((int(a), int(b), int(c))) for c, b, a in zip(zz, yy, xx)])
    np.testing.assert_allclose(inst.centroid_mm, points.mean(axis=0), atol=1e-9)
    assert np.all(points >= np.array(inst.bbox_min_mm) - 1e-9) and np.all(points <= np.array(inst.bbox_max_mm) + 1e-9)


def test_score_is_the_mean_probability_of_the_class_over_the_instance():
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[0:2, 0:2, 0:2] = 1
    labels[2:4, 5:8, 5:8] = 2
    rng = np.random.default_rng(0)
    probs = {1: rng.random(labels.shape), 2: rng.random(labels.shape)}
    asked: list[int] = []

    def probability(label: int) -> np.ndarray:
        asked.append(label)
        return probs[label]

    _, table = find_instances(labels, _geometry(labels.shape), probability=probability)
    assert asked == [1, 2]  # once per label present
    assert table[0].score == pytest.approx(probs[1][0:2, 0:2, 0:2].mean())
    assert table[1].score == pytest.approx(probs[2][2:4, 5:8, 5:8].mean())


def test_probability_valley_moves_the_split_line():
    mask, _, geometry = _two_touching_spheres(gap_mm=15.0)
    probability = np.ones(mask.shape)
    probability[..., 22:24] = 0.05  # a valley left of the neck (x = 25.5): the line follows it
    options = InstanceOptions(split_touching=True)
    ids_plain, _ = find_instances(mask.astype(np.uint8), geometry, options)
    ids_prob, table = find_instances(mask.astype(np.uint8), geometry, options, lambda label: probability)
    assert len(table) == 2
    left_plain = int((ids_plain == ids_plain[20, 20, 18]).sum())
    left_prob = int((ids_prob == ids_prob[20, 20, 18]).sum())
    assert left_prob < left_plain


def test_label_map_must_match_the_geometry():
    with pytest.raises(MedsegError, match="shape"):
        find_instances(np.zeros((2, 3, 4), np.uint8), _geometry((2, 3, 5)))
