"""Round-trip Dice of labels at a coarser spacing (the resolution lever's accuracy bound)."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.preprocessing.resolution import roundtrip_dice


def _ball(shape, centre, radius):
    zz, yy, xx = np.indices(shape)
    return ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) <= radius**2


def test_same_spacing_is_exact_and_absent_labels_are_left_out():
    lab = _ball((20, 30, 30), (10, 15, 15), 6).astype(np.int16)
    assert roundtrip_dice(lab, (1, 1, 1), (1, 1, 1), [1, 2]) == {1: 1.0}


def test_small_structures_lose_more_than_large_ones():
    lab = np.zeros((40, 64, 64), np.int16)
    lab[_ball(lab.shape, (20, 20, 20), 12)] = 1
    lab[_ball(lab.shape, (20, 48, 48), 3)] = 2
    d = roundtrip_dice(lab, (1, 1, 1), (2, 2, 2), [1, 2])
    assert 0.9 < d[1] < 1.0
    assert d[2] < d[1] - 0.05


def test_coarser_is_worse():
    lab = _ball((40, 64, 64), (20, 32, 32), 8).astype(np.int16)
    d15 = roundtrip_dice(lab, (1, 1, 1), (1.5, 1.5, 1.5), [1])[1]
    d3 = roundtrip_dice(lab, (1, 1, 1), (3, 3, 3), [1])[1]
    assert d3 < d15 < 1.0
    assert d15 == pytest.approx(roundtrip_dice(lab, (1, 1, 1), (1.5, 1.5, 1.5), [1])[1])
