"""Dense CRF: confident predictions kept, isolated low-confidence blobs removed, the predict hook, find-best's choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.inference.case_output import FinishedCase
from medseg.io.image import ImageGeometry, write_image
from medseg.postprocessing.crf import CrfParams, crf_labels, dense_crf
from medseg.postprocessing.crf_output import CrfPostprocess, crf_params_of

SHAPE = (20, 28, 36)


def _scene(blob_p: float = 0.6) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities (2, Z, Y, X) of a confident sphere and a low-confidence blob; image; both masks."""
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    sphere = (z - 10) ** 2 + (y - 14) ** 2 + (x - 10) ** 2 <= 25
    blob = (z - 10) ** 2 + (y - 14) ** 2 + (x - 27) ** 2 <= 4
    fg = np.where(sphere, 0.98, 0.02)
    fg = np.where(blob, blob_p, fg)
    image = np.where(sphere, 3.0, 0.0) + np.random.default_rng(0).normal(0, 0.2, SHAPE)
    return np.stack([1 - fg, fg]).astype(np.float32), image.astype(np.float32), sphere, blob


def test_confident_prediction_is_unchanged_and_low_confidence_blob_removed() -> None:
    probs, image, sphere, blob = _scene()
    labels = crf_labels(probs, image, (1.0, 1.0, 1.0), [0, 1])
    plain = probs.argmax(0)
    assert plain[blob].all()  # the argmax keeps the blob ...
    assert not labels[blob].any()  # ... the CRF removes it
    np.testing.assert_array_equal(labels[~blob], plain[~blob])  # everything confident is unchanged


def test_marginals_are_probabilities_and_spacing_matters() -> None:
    probs, image, _, blob = _scene(blob_p=0.75)
    q = dense_crf(probs, image, (1.0, 1.0, 1.0))
    assert q.shape == probs.shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
    coarse = dense_crf(probs, image, (5.0, 5.0, 5.0))  # the same kernels in mm reach fewer voxels
    assert coarse[1][blob].mean() > q[1][blob].mean()


def test_no_kernels_returns_the_input() -> None:
    probs, image, _, _ = _scene()
    q = dense_crf(probs, image, (1.0, 1.0, 1.0), CrfParams(bilateral_weight=0.0, spatial_weight=0.0, iterations=2))
    np.testing.assert_allclose(q, probs, atol=1e-5)


def test_two_dimensional_slice() -> None:
    probs, image, sphere, blob = _scene()
    labels = crf_labels(probs[:, 10], image[10], (1.0, 1.0), [0, 7])
    assert labels.shape == SHAPE[1:] and set(np.unique(labels)) == {0, 7}
    assert not labels[blob[10]].any() and (labels[sphere[10]] == 7).all()


def test_params_check_and_round_trip() -> None:
    p = CrfParams(bilateral_weight=2.0, iterations=3)
    assert CrfParams.from_dict(p.to_dict()) == p
    with pytest.raises(MedsegError, match="iterations"):
        CrfParams(iterations=0)
    with pytest.raises(MedsegError, match="unknown keys"):
        CrfParams.from_dict({"weight": 1})
    assert crf_params_of({"per_label": {}}) is None
    assert crf_params_of({"crf": p.to_dict()}) == p
    with pytest.raises(MedsegError, match="do not fit"):
        dense_crf(np.ones((2, 3, 3, 3), np.float32) / 2, np.zeros((3, 3, 4)), (1, 1, 1))


def test_hook_rewrites_the_label_map_then_applies_the_rules(tmp_path: Path) -> None:
    probs, image, sphere, blob = _scene()
    geometry = ImageGeometry(SHAPE, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_image(image, geometry, tmp_path / "img.nii.gz")
    labels = np.where(probs.argmax(0) == 1, 3, 0).astype(np.uint8)
    case = FinishedCase(
        "c1",
        labels,
        geometry,
        (0, 3),
        lambda label: probs[(0, 3).index(label)],
        tmp_path / "c1.nii.gz",
        tmp_path / "img.nii.gz",
    )
    rules = {"per_label": {"3": [{"op": "opening", "radius": 1}]}}
    hook = CrfPostprocess(CrfParams(), rules)
    hook(case)
    assert not labels[blob].any() and labels.dtype == np.uint8  # rewritten in place
    assert (labels[sphere] == 3).mean() > 0.9 and set(np.unique(labels)) == {0, 3}
    assert hook.seconds["c1"] > 0
    region = FinishedCase("c2", labels, geometry, (0, 3), None, tmp_path / "c2.nii.gz", tmp_path / "img.nii.gz")
    with pytest.raises(MedsegError, match="region-based"):
        hook(region)
