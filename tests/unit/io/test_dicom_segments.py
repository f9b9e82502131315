"""SNOMED CT codes and colours of labels in DICOM output (:func:`medseg.io.dicom_segments.describe_label`)."""

from __future__ import annotations

import pytest

from medseg.io.dicom_segments import KNOWN, PALETTE, describe_label


@pytest.mark.parametrize(
    "name, code, category",
    [
        ("liver", "10200004", "91723000"),
        ("Liver", "10200004", "91723000"),
        ("kidney_left", "64033007", "91723000"),
        ("Right Kidney", "64033007", "91723000"),
        ("r_kidney", "64033007", "91723000"),
        ("Inferior vena cava", "", "91723000"),
        ("urinary-bladder", "", "91723000"),
        ("tumour", "108369006", "49755003"),
        ("edema", "79654002", "49755003"),
    ],
)
def test_known_names(name, code, category):
    described = describe_label(3, name)
    assert described.known and described.name == name
    assert described.type.scheme_designator == "SCT" and described.category.value == category
    if code:
        assert described.type.value == code


def test_unknown_name_is_generic_tissue_with_a_stable_colour():
    first, again = describe_label(2, "anterior"), describe_label(2, "anterior")
    assert not first.known and first.type.value == first.category.value == "85756007"  # SNOMED CT Tissue
    assert first.rgb == again.rgb == PALETTE[1]
    assert describe_label(2 + len(PALETTE), "x").rgb == PALETTE[1]
    assert describe_label(1, "x").rgb != first.rgb


def test_table_colours_are_rgb():
    for category, kind, rgb in KNOWN.values():
        assert len(rgb) == 3 and all(0 <= v <= 255 for v in rgb)
        assert category.scheme_designator == kind.scheme_designator == "SCT"
