"""find-best's CRF search keeps the CRF only when it raises the mean foreground Dice."""

from __future__ import annotations

import numpy as np

from medseg.ensembling.crf_selection import select_crf
from medseg.postprocessing.crf import CrfParams

SHAPE = (16, 24, 24)


def _case(with_blob: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    sphere = (z - 8) ** 2 + (y - 8) ** 2 + (x - 8) ** 2 <= 16
    blob = (z - 8) ** 2 + (y - 17) ** 2 + (x - 17) ** 2 <= 4
    fg = np.where(sphere, 0.97, 0.03)
    if with_blob:  # a false positive of low confidence on a background-like intensity
        fg = np.where(blob, 0.6, fg)
    probs = np.stack([1 - fg, fg]).astype(np.float32)
    image = np.where(sphere, 2.0, 0.0).astype(np.float32)
    return probs, np.where(sphere, 5, 0), image


def test_crf_kept_when_it_removes_false_positives() -> None:
    cases = {"a": _case(True), "b": _case(True)}
    rules: dict = {"per_label": {}}
    out = select_crf(
        list(cases),
        lambda c: cases[c][:2],
        lambda c: (cases[c][2], (1.0, 1.0, 1.0)),
        rules,
        [0, 5],
        candidates=(CrfParams(iterations=3),),
        progress=False,
    )
    assert out is rules and out["crf"] == CrfParams(iterations=3).to_dict()
    search = out["crf_search"]
    assert search["candidates"][0]["mean_foreground_dice"] > search["mean_foreground_dice_without"]


def test_crf_not_kept_when_it_cannot_help() -> None:
    cases = {"a": _case(False)}
    rules: dict = {"per_label": {}, "crf": {"iterations": 2}}  # a stale choice is dropped
    out = select_crf(
        ["a"],
        lambda c: cases[c][:2],
        lambda c: (cases[c][2], (1.0, 1.0, 1.0)),
        rules,
        [0, 5],
        candidates=(CrfParams(iterations=3),),
        progress=False,
    )
    assert "crf" not in out
    assert out["crf_search"]["mean_foreground_dice_without"] == 1.0
