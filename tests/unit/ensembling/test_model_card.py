"""The model card's cross-validation table: label ids in numeric order, region keys after them."""

from __future__ import annotations

from medseg.ensembling.model_card import _label_order


def test_cross_validation_rows_order_labels_then_regions():
    keys = ["(2, 3)", "10", "2", "(1, 2, 3)", "1"]
    assert sorted(keys, key=_label_order) == ["1", "2", "10", "(1, 2, 3)", "(2, 3)"]
