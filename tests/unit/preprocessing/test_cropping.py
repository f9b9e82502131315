"""Cropping to the nonzero region: bounding box on hand-built arrays."""

from __future__ import annotations

import numpy as np

from medseg.preprocessing import bounding_box, crop_to_nonzero, nonzero_mask


def test_bbox_is_union_over_channels():
    image = np.zeros((2, 10, 12, 14), dtype=np.float32)
    image[0, 2:5, 3:7, 4:6] = 1.0
    image[1, 4:8, 1:2, 9:11] = -3.0  # negative values count as nonzero
    label = np.zeros((10, 12, 14), dtype=np.int8)
    label[3, 4, 5] = 2
    cropped, lab, mask, bbox = crop_to_nonzero(image, label)
    assert bbox == ((2, 8), (1, 7), (4, 11))
    assert cropped.shape == (2, 6, 6, 7)
    assert lab.shape == (6, 6, 7) and lab[1, 3, 1] == 2 and lab.sum() == 2
    np.testing.assert_array_equal(cropped, image[:, 2:8, 1:7, 4:11])
    assert mask.shape == (6, 6, 7) and mask.dtype == bool


def test_holes_are_filled_in_mask_but_bbox_unchanged():
    image = np.zeros((1, 9, 9, 9), dtype=np.float32)
    image[0, 2:7, 2:7, 2:7] = 5.0
    image[0, 4, 4, 4] = 0.0  # enclosed hole
    mask = nonzero_mask(image)
    assert mask[4, 4, 4]
    assert mask.sum() == 125
    assert bounding_box(mask) == ((2, 7), (2, 7), (2, 7))


def test_all_zero_image_is_kept_whole():
    image = np.zeros((1, 4, 5, 6), dtype=np.float32)
    cropped, _, mask, bbox = crop_to_nonzero(image)
    assert bbox == ((0, 4), (0, 5), (0, 6))
    assert cropped.shape == (1, 4, 5, 6)
    assert not mask.any()


def test_full_image_is_not_cropped():
    image = np.ones((1, 3, 4, 5), dtype=np.float32)
    assert crop_to_nonzero(image)[3] == ((0, 3), (0, 4), (0, 5))
