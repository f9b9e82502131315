"""Preview PNGs of ``predict --preview``: the expected pixel size, a grey image with a coloured overlay (only grey
without structures), slices through the largest structure, every case shown in the patient axes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread

from medseg.errors import MedsegError
from medseg.inference.case_output import FinishedCase
from medseg.io.image import ImageGeometry, write_image
from medseg.postprocessing import PREVIEW_DIR, PreviewWriter, render_preview
from medseg.postprocessing.preview import largest_structure, patient_axes, preview_size_px

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
SPACING = (4.0, 0.7, 0.9)


def pixels(png: bytes) -> np.ndarray:
    """``(H, W, 4)`` RGBA in [0, 1]."""
    return np.asarray(imread(io.BytesIO(png), format="png"))


def scene(shape=(12, 30, 24)) -> tuple[np.ndarray, np.ndarray, ImageGeometry]:
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 20.0, shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[3:9, 8:20, 6:18] = 2
    labels[1:3, 2:5, 2:5] = 1
    image[labels > 0] += 200.0
    return image, labels, ImageGeometry(shape, SPACING, (0.0, 0.0, 0.0), IDENTITY)


def coloured(rgba: np.ndarray) -> int:
    """How many pixels are clearly not grey."""
    rgb = rgba[..., :3]
    return int(((rgb.max(-1) - rgb.min(-1)) > 0.1).sum())


def test_a_preview_has_the_size_a_grey_image_and_a_coloured_overlay():
    image, labels, geo = scene()
    rgba = pixels(render_preview(image, labels, geo, "case_0", {1: "vessel", 2: "liver"}))
    width, height = preview_size_px(3)
    assert rgba.shape[:2] == (height, width) and (width, height) == (1200, 500)
    assert rgba[..., :3].std() > 0.05  # not blank
    assert coloured(rgba) > 1000

    empty = pixels(render_preview(image, np.zeros_like(labels), geo, "case_0", {1: "vessel", 2: "liver"}))
    assert empty.shape == rgba.shape and empty[..., :3].std() > 0.05
    assert coloured(empty) == 0  # no structure: the grey slices only, no overlay, no legend

    flat = pixels(render_preview(np.zeros_like(image), labels, geo, "flat"))  # a constant image still draws
    assert flat.shape == rgba.shape and coloured(flat) > 1000
    with pytest.raises(MedsegError, match="differ in shape"):
        render_preview(image[:2], labels, geo, "bad")


def test_a_2d_case_is_one_panel():
    geo = ImageGeometry((40, 30), (0.5, 1.5), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    labels = np.zeros(geo.shape, np.uint8)
    labels[10:20, 5:15] = 3
    image = np.linspace(0, 1, 1200, dtype=np.float32).reshape(geo.shape)
    rgba = pixels(render_preview(image, labels, geo, "slice"))
    width, height = preview_size_px(2)
    assert rgba.shape[:2] == (height, width) and width < preview_size_px(3)[0]
    assert coloured(rgba) > 100


def test_the_largest_structure_is_cut_even_when_it_is_not_convex():
    labels = np.zeros((5, 20, 20), np.uint8)
    labels[2, 2:18, 2:18] = 1
    labels[2, 4:16, 4:16] = 0  # a ring of 16 * 16 - 12 * 12 = 112 voxels: its centroid lies in the hole
    labels[0, 0:5, 0:5] = 2  # 25 voxels
    labels[4, 0:10, 0:10] = 2  # 100 voxels, a separate component of label 2
    label, voxels, index = largest_structure(labels, (1.0, 1.0, 1.0))
    assert (label, voxels) == (1, 112) and labels[index] == 1
    labels[4, 0:12, 0:12] = 2  # now 144 voxels: the largest
    label, voxels, index = largest_structure(labels, (1.0, 1.0, 1.0))
    assert (label, voxels) == (2, 144) and index[0] == 4 and labels[index] == 2
    assert largest_structure(np.zeros((3, 3, 3), np.uint8), (1.0, 1.0, 1.0)) is None


def test_flipped_images_are_shown_in_the_patient_axes():
    image, labels, geo = scene()
    flipped = ImageGeometry(
        geo.shape,
        geo.spacing,
        ((geo.shape[2] - 1) * SPACING[2], 0.0, (geo.shape[0] - 1) * SPACING[0]),
        (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    )
    # the same patient: the arrays flipped along x and z with a direction that flips them back
    a = patient_axes(image, labels, geo)
    b = patient_axes(image[::-1, :, ::-1].copy(), labels[::-1, :, ::-1].copy(), flipped)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.spacing == b.spacing == pytest.approx(SPACING)
    assert a.world((3, 4, 5)) == pytest.approx(b.world((3, 4, 5)))
    assert render_preview(image, labels, geo, "c") == render_preview(
        image[::-1, :, ::-1].copy(), labels[::-1, :, ::-1].copy(), flipped, "c"
    )


@pytest.mark.parametrize(
    "direction",
    [
        (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0),  # x and y swapped, two flips
        (0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0, -1.0, 0.0),  # a sagittal acquisition
        (0.94, -0.34202, 0.0, 0.34202, 0.94, 0.0, 0.0, 0.0, 1.0),  # oblique: its nearest axes
    ],
)
def test_the_patient_axes_agree_with_simpleitk_dicom_orient(direction):
    image, labels, _ = scene()
    geo = ImageGeometry(image.shape, SPACING, (3.0, -4.0, 5.0), direction)
    view = patient_axes(image, labels, geo)
    reference = sitk.GetImageFromArray(image)
    geo.apply_to(reference)
    oriented = sitk.DICOMOrient(reference, "LPS")
    np.testing.assert_array_equal(view.image, sitk.GetArrayFromImage(oriented))
    assert view.spacing == pytest.approx(tuple(reversed(oriented.GetSpacing())))
    index = (2, 5, 7)
    assert view.world(index) == pytest.approx(oriented.TransformIndexToPhysicalPoint(tuple(reversed(index))))


def test_the_writer_puts_one_png_per_case_in_the_previews_folder(tmp_path):
    image, labels, geo = scene()
    image_path = tmp_path / "in" / "c_0000.nii.gz"
    write_image(image, geo, image_path)
    writer = PreviewWriter(tmp_path / "out", {2: "liver"})
    assert writer.missing(["c"]) == ["c"]
    writer(FinishedCase("c", labels, geo, (0, 1, 2), None, tmp_path / "out" / "c.nii.gz", image_path))
    png = tmp_path / "out" / PREVIEW_DIR / "c.png"
    assert writer.written == ["c"] and writer.missing(["c"]) == [] and png.is_file()
    assert pixels(png.read_bytes()).shape[:2] == preview_size_px(3)[::-1]
    assert [p.name for p in png.parent.iterdir()] == ["c.png"]  # no temporary file left
