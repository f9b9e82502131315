"""The mirror-axis rule: axes along which two classes always lie in the same order are not mirrored."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from medseg.planning.mirroring import (
    ALPHA,
    ORDER_CONSISTENCY,
    order_evidence,
    ordered_axes,
    plan_mirror_axes,
    sign_test_p,
)


def fingerprint(centroids: list[dict[int, tuple[float, ...]]], spacing=(1.0, 1.0, 1.0)) -> Fingerprint:
    ndim = len(spacing)
    cases = tuple(
        CaseFingerprint(
            case_id=f"c{i}",
            spacing=tuple(spacing),
            shape=(20,) * ndim,
            shape_after_crop=(20,) * ndim,
            relative_size_after_crop=1.0,
            class_voxel_counts={k: 10 for k in c},
            class_centroids=c,
        )
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
    few = two_classes_ordered_along_z(n=9)  # 100 % agreement in 9 cases: p = 2 / 2**9 x 3 tests > 0.01
    assert plan_mirror_axes(few, (0, 1, 2))[0] == (0, 1, 2)
    no_centroids = fingerprint([{} for _ in range(20)])  # e.g. an unlabelled or older fingerprint
    assert plan_mirror_axes(no_centroids, (0, 1, 2))[0] == (0, 1, 2)


@pytest.mark.parametrize("exceptions, ordered", [(1, True), (3, False)])
def test_consistency_threshold(exceptions, ordered):
    n = 40  # 1 of 40 reversed = 97.5 % agree (>= 95 %); 3 of 40 = 92.5 % (< 95 %)
    cases = [
        {1: (5.0, 5.0, 5.0), 2: (2.0 if i < exceptions else 8.0, 5.0 + (-1) ** i, 5.0 + (-1) ** (i // 2))}
        for i in range(n)
    ]
    assert (1 - exceptions / n >= ORDER_CONSISTENCY) == ordered
    assert (0 in ordered_axes(fingerprint(cases))) == ordered


def test_pairs_are_compared_only_where_both_classes_are_present():
    # classes 1 and 2 never co-occur; 1 and 3 are ordered along X in the 12 cases that have both
    cases = [{1: (5.0, 5.0, 2.0), 3: (5.0 + (-1) ** i, 5.0 + (-1) ** (i // 2), 9.0)} for i in range(12)]
    cases += [{2: (5.0, 5.0, 5.0)} for _ in range(12)]
    orders = ordered_axes(fingerprint(cases))
    assert set(orders) == {2} and orders[2].cases == 12 and (orders[2].first, orders[2].second) == (1, 3)


def test_sign_test_needs_ten_cases_for_two_classes_in_3d():
    assert sign_test_p(6, 6) == pytest.approx(2 / 2**6)
    assert sign_test_p(5, 10) == 1.0
    assert sign_test_p(0, 10) == sign_test_p(10, 10)  # two-sided
    assert sign_test_p(10_000, 10_000) == 0.0  # no overflow for large datasets
    assert 0 not in ordered_axes(two_classes_ordered_along_z(n=9))
    z = ordered_axes(two_classes_ordered_along_z(n=10))[0]
    assert z.tests == 3 and z.p_corrected == pytest.approx(3 * 2 / 2**10) and z.p_corrected <= ALPHA


def test_six_tumour_cases_with_chance_orderings_keep_every_axis():
    """4 sub-regions in 6 cases, each class in the same order along every axis in all 6: still chance."""
    rng = np.random.default_rng(3)
    cases = []
    for _ in range(6):
        base = rng.uniform(40, 60, 3)
        cases.append({k: tuple(base + k * np.array([4.0, 3.0, 5.0]) + rng.normal(0, 0.5, 3)) for k in (1, 2, 3, 4)})
    fp = fingerprint(cases)
    axes, notes = plan_mirror_axes(fp, (0, 1, 2), {1: "necrosis", 2: "edema", 3: "non_enhancing", 4: "enhancing"})
    assert axes == (0, 1, 2) and "not_mirrored" not in notes
    weak = notes["order_not_established"]
    assert set(weak) == {"0", "1", "2"}
    for axis in weak.values():
        assert axis["consistency"] == 1.0 and axis["cases"] == 6 and axis["tests"] == 18
        assert axis["sign_test_p_bonferroni"] == pytest.approx(18 * 2 / 2**6, rel=1e-2)  # > ALPHA
    # the same geometry in 40 cases is an established order along every axis
    many = fingerprint(cases * 7)
    assert set(ordered_axes(many)) == {0, 1, 2}


def test_consistent_but_tiny_or_noisy_offsets_are_not_an_order():
    rng = np.random.default_rng(4)
    # class 2 is always 0.3 mm after class 1 along Z: consistent and significant, but under a voxel
    tiny = fingerprint([{1: (5.0, *rng.uniform(0, 9, 2)), 2: (5.3, *rng.uniform(0, 9, 2))} for _ in range(40)])
    ev = order_evidence(tiny)[0]
    assert ev.consistency == 1.0 and ev.p_corrected <= ALPHA and not ev.ordered
    assert plan_mirror_axes(tiny, (0, 1, 2))[0] == (0, 1, 2)
    # offsets of 1-30 mm, always positive: consistent, but the median is under 2 robust SD of the spread
    noisy = fingerprint(
        [
            {1: (0.0, 5.0, 5.0), 2: (float(d), 5.0 + (-1) ** i, 5.0 + (-1) ** (i // 2))}
            for i, d in enumerate(np.geomspace(1, 30, 40))
        ]
    )
    ev = order_evidence(noisy)[0]
    assert ev.consistency == 1.0 and ev.effect < 2.0 and not ev.ordered
