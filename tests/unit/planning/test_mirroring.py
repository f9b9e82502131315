"""The mirror-axis rule: axes along which two classes always lie in the same order are not mirrored."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from medseg.planning.mirroring import MIN_CASES, ORDER_CONSISTENCY, ordered_axes, plan_mirror_axes


def fingerprint(centroids: list[dict[int, tuple[float, ...]]], spacing=(1.0, 1.0, 1.0)) -> Fingerprint:
    ndim = len(spacing)
    cases = tuple(
        CaseFingerprint(case_id=f"c{i}", spacing=tuple(spacing), shape=(20,) * ndim, shape_after_crop=(20,) * ndim,
                        relative_size_after_crop=1.0, class_voxel_counts={k: 10 for k in c}, class_centroids=c)
        for i, c in enumerate(centroids)
    )
    labels = tuple(sorted({0, *(k for c in centroids for k in c)}))
    stats = IntensityStats(0.0, 1.0, 0.0, -1.0, 1.0, -1.0, 1.0, 10)
    return Fingerprint("t", ("MRI",), labels, cases, (stats,))


def two_classes_ordered_along_z(n: int = 30, seed: int = 0) -> Fingerprint:
    """Class 1 always 5 voxels before class 2 along Z; their order along Y and X is random."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        c1 = rng.uniform(5, 15, 3)
        c2 = c1 + np.array([5.0 + rng.normal(0, 1), rng.normal(0, 3), rng.normal(0, 3)])
        cases.append({1: tuple(c1), 2: tuple(c2)})
    return fingerprint(cases)


def test_axis_with_a_fixed_class_order_is_not_mirrored():
    fp = two_classes_ordered_along_z()
    axes, notes = plan_mirror_axes(fp, (0, 1, 2), {1: "head", 2: "tail"})
    assert axes == (1, 2)
    assert notes["mirror_axes"] == [1, 2]
    z = notes["not_mirrored"]["0"]
    assert z["order"] == "head before tail" and z["label_ids"] == [1, 2]
    assert z["cases"] == 30 and z["consistency"] == 1.0
    assert 4.0 < z["median_offset_mm"] < 6.0


def test_order_is_measured_in_mm_and_reversed_order_is_found():
    cases = [{1: (10.0, 4.0, 3.0), 2: (10.0 + (i % 3 - 1) * 0.5, 2.0, 3.0 + (-1) ** i)} for i in range(10)]
    fp = fingerprint(cases, spacing=(3.0, 0.5, 0.7))
    orders = ordered_axes(fp)
    assert set(orders) == {1}
    assert (orders[1].first, orders[1].second) == (2, 1)  # class 2 has the lower Y index
    assert orders[1].median_offset_mm == pytest.approx(2.0 * 0.5)


def test_2d_configuration_maps_patch_axes_to_in_plane_array_axes():
    fp = two_classes_ordered_along_z()
    assert plan_mirror_axes(fp, (1, 2))[0] == (0, 1)  # slices along Z: the fixed Z order does not matter
    cases = [{1: (10.0, 3.0 + (-1) ** i, 2.0), 2: (10.0, 3.0, 9.0)} for i in range(10)]  # fixed along X
    axes, notes = plan_mirror_axes(fingerprint(cases), (1, 2))
    assert axes == (0,) and set(notes["not_mirrored"]) == {"1"}


def test_random_order_single_class_and_too_few_cases_keep_every_axis():
    rng = np.random.default_rng(1)
    random_order = fingerprint([{1: tuple(rng.uniform(0, 20, 3)), 2: tuple(rng.uniform(0, 20, 3))} for _ in range(40)])
    assert plan_mirror_axes(random_order, (0, 1, 2))[0] == (0, 1, 2)
    single = fingerprint([{1: tuple(rng.uniform(0, 20, 3))} for _ in range(40)])
    assert plan_mirror_axes(single, (0, 1, 2)) == ((0, 1, 2), {"mirror_axes": [0, 1, 2]})
    few = two_classes_ordered_along_z(n=MIN_CASES - 1)
    assert plan_mirror_axes(few, (0, 1, 2))[0] == (0, 1, 2)
    no_centroids = fingerprint([{} for _ in range(20)])  # e.g. an unlabelled or older fingerprint
    assert plan_mirror_axes(no_centroids, (0, 1, 2))[0] == (0, 1, 2)


@pytest.mark.parametrize("exceptions, ordered", [(1, True), (3, False)])
def test_consistency_threshold(exceptions, ordered):
    n = 40  # 1 of 40 reversed = 97.5 % agree (>= 95 %); 3 of 40 = 92.5 % (< 95 %)
    cases = [{1: (5.0, 5.0, 5.0), 2: (2.0 if i < exceptions else 8.0, 5.0 + (-1) ** i, 5.0 + (-1) ** (i // 2))}
             for i in range(n)]
    assert (1 - exceptions / n >= ORDER_CONSISTENCY) == ordered
    assert (0 in ordered_axes(fingerprint(cases))) == ordered


def test_pairs_are_compared_only_where_both_classes_are_present():
    # classes 1 and 2 never co-occur; 1 and 3 are ordered along X in the 12 cases that have both
    cases = [{1: (5.0, 5.0, 2.0), 3: (5.0 + (-1) ** i, 5.0 + (-1) ** (i // 2), 9.0)} for i in range(12)]
    cases += [{2: (5.0, 5.0, 5.0)} for _ in range(12)]
    orders = ordered_axes(fingerprint(cases))
    assert set(orders) == {2} and orders[2].cases == 12 and (orders[2].first, orders[2].second) == (1, 3)
