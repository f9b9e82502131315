"""find-best's CRF search keeps the CRF only when it raises the mean foreground Dice by 2 paired standard errors."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.ensembling import crf_selection
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


def _fixing_crf(fixed: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[np.ndarray, ...]]:
    """Cases whose argmax misses ``fixed[case]`` voxels of the sphere, and a stand-in CRF that restores them."""
    cases: dict[str, tuple[np.ndarray, ...]] = {}
    for name, n in fixed.items():
        probs, ref, image = _case(False)
        missed = np.argwhere(ref == 5)[:n]
        probs[:, missed[:, 0], missed[:, 1], missed[:, 2]] = np.array([[0.9], [0.1]], dtype=np.float32)
        cases[name] = (probs, ref, image)
    by_image = {id(c[2]): c[1] for c in cases.values()}
    monkeypatch.setattr(crf_selection, "crf_labels", lambda probs, image, *_: by_image[id(image)].copy())
    return cases


def _search(cases: dict[str, tuple[np.ndarray, ...]]) -> dict:
    return select_crf(
        list(cases),
        lambda c: cases[c][:2],
        lambda c: (cases[c][2], (1.0, 1.0, 1.0)),
        {"per_label": {}},
        [0, 5],
        candidates=(CrfParams(),),
        progress=False,
    )


def test_a_gain_on_one_case_of_four_is_too_thin_to_keep(monkeypatch: pytest.MonkeyPatch) -> None:
    # differences (d, 0, 0, 0): mean d/4, standard error d/4, one SE < MIN_GAIN_SE
    out = _search(_fixing_crf({"a": 6, "b": 0, "c": 0, "d": 0}, monkeypatch))
    search = out["crf_search"]
    assert search["candidates"][0]["mean_foreground_dice"] > search["mean_foreground_dice_without"]
    assert search["best_gain"] == pytest.approx(search["best_gain_se"]) and search["best_gain"] > 0
    assert "crf" not in out


def test_a_gain_on_every_case_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _search(_fixing_crf({"a": 6, "b": 5, "c": 7, "d": 6}, monkeypatch))
    search = out["crf_search"]
    assert search["best_gain"] >= crf_selection.MIN_GAIN_SE * search["best_gain_se"] > 0
    assert out["crf"] == CrfParams().to_dict()
