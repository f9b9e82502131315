"""RTSTRUCT output (:func:`medseg.io.rtstruct_writer.write_rtstruct`) and rasterisation
(:mod:`medseg.io.rtstruct_reader`) on the real DICOM of ``../shared/data/dicom``.

Round-trip bound: the writer's contours pass through the midpoints between foreground and background pixel
centres, so every pixel centre lies at least 0.35 pixel (half a pixel along an edge, ``0.5 / sqrt(2)`` at a
corner cut) from a contour, while storing the coordinates to 1e-4 mm moves them by under 1e-3 pixel here. Filling
the polygons (pixel centres inside, even-odd) therefore gives back exactly the mask: Dice 1.0, asserted as equality.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pydicom
import pytest
import skimage.draw

from medseg.errors import DicomError
from medseg.io.dicom_slices import read_source_slices
from medseg.io.rtstruct_reader import fill_polygon, rasterise_rtstruct, rasterise_rtstruct_masks
from medseg.io.rtstruct_writer import write_rtstruct
from tests.unit.io._dicom import copy_series, dicom_data, liver_reference, rotate_series, sorted_slices

NAMES = {1: "liver", 2: "Right Kidney", 4: "thing"}


def _hard_labels() -> np.ndarray:
    """The real liver mask plus shapes that stress contouring: a ring (hole), a checkerboard (diagonal-only
    neighbours), a one-pixel line and a single pixel, touching the image border too."""
    labels, _ = liver_reference()
    labels = labels.copy()
    labels[1, 200:230, 300:330] = 2
    labels[1, 208:222, 308:322] = 0  # hole
    labels[1, 210:214, 312:316] = 4  # island in the hole, another label
    checker = (np.add.outer(np.arange(8), np.arange(8)) % 2).astype(bool)
    labels[2, 400:408, 400:408][checker] = 4
    labels[0, 450, 10:60] = 2
    labels[2, 0:5, 0:5] = 2  # at the corner of the image
    labels[0, 30, 480] = 4
    return labels


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.mark.parametrize("oblique", [False, True])
def test_rtstruct_round_trip_gives_back_the_mask(tmp_path, oblique, capsys):
    files = copy_series("ct_3slice", tmp_path / "ct")
    if oblique:
        rotate_series(files, (0.3, -0.5, 0.8), 0.7)
    labels = _hard_labels()
    written = write_rtstruct(labels, files, NAMES, tmp_path / "out" / "rt.dcm", model_id="Dataset9 unet")
    assert written is not None and written.rois == {1: 1, 2: 2, 4: 3}
    back, names = rasterise_rtstruct(written.path, files)
    assert names == ["liver", "Right Kidney", "thing"]
    ids = np.array([0, 1, 2, 4])[back]  # ROI i -> label id of the i-th present label
    dices = {label: _dice(labels == label, ids == label) for label in NAMES}
    with capsys.disabled():
        print(f"\nRTSTRUCT round trip Dice ({'oblique' if oblique else 'axial'}): {dices}")
    assert all(d == 1.0 for d in dices.values())
    np.testing.assert_array_equal(ids, labels)


def test_rtstruct_references_the_series_and_describes_rois(tmp_path):
    files = copy_series("ct_3slice", tmp_path / "ct")
    written = write_rtstruct(_hard_labels(), files, NAMES, tmp_path / "rt.dcm", model_id="Dataset9 unet")
    ds = pydicom.dcmread(written.path)
    source = sorted_slices(files)
    assert ds.Modality == "RTSTRUCT" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    assert ds.StudyInstanceUID == source[0].StudyInstanceUID and ds.PatientID == source[0].PatientID
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source[0].SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == [s.SOPInstanceUID for s in source]
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["liver", "Right Kidney", "thing"]
    assert all("Dataset9 unet" in r.ROIGenerationDescription for r in ds.StructureSetROISequence)
    assert [list(c.ROIDisplayColor) for c in ds.ROIContourSequence][:2] == [[221, 130, 101], [185, 102, 83]]
    kidney = ds.RTROIObservationsSequence[1]
    assert kidney.RTROIIdentificationCodeSequence[0].CodeValue == "64033007"  # SNOMED CT Kidney
    uids = {s.SOPInstanceUID: float(s.ImagePositionPatient[2]) for s in source}
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            z = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)[:, 2]
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            assert len(z) == contour.NumberOfContourPoints >= 3
            np.testing.assert_allclose(z, uids[contour.ContourImageSequence[0].ReferencedSOPInstanceUID], atol=1e-4)


def test_real_rtstruct_rasterises_on_its_ct(tmp_path, caplog):
    files = copy_series("rtstruct_ct", tmp_path / "ct")
    with caplog.at_level(logging.WARNING):
        labels, names = rasterise_rtstruct(dicom_data() / "rtstruct_ct" / "rtstruct.dcm", files)
    assert names == ["ROI-1"] and labels.shape == (2, 512, 512)
    assert "frame of reference" in caplog.text  # this sample's RTSTRUCT names another frame of reference
    slices = read_source_slices(files)
    assert float(slices.positions[0][2]) == 60.0  # both contours lie on z = 60 mm: the first slice
    assert labels[1].sum() == 0 and labels[0].sum() > 0
    # an outer square (-51..-27 mm) with a square hole (-47..-32 mm): a ring, 0.488 mm pixels from -125 mm
    pixel = lambda mm: round((mm + 125.0) / 0.488281)  # noqa: E731
    assert labels[0, pixel(-49), pixel(-49)] == 1 and labels[0, pixel(-29), pixel(-40)] == 1
    assert labels[0, pixel(-40), pixel(-40)] == 0 and labels[0, pixel(-60), pixel(-60)] == 0
    ring = (24 / 0.488281) ** 2 - (15 / 0.488281) ** 2
    assert abs(int(labels.sum()) - ring) < 4 * 24 / 0.488281  # within a pixel of each boundary


def test_overlapping_rois_are_named(tmp_path):
    files = copy_series("ct_3slice", tmp_path / "ct")
    labels, _ = liver_reference()
    written = write_rtstruct(labels, files, {1: "liver"}, tmp_path / "rt.dcm", model_id="m")
    ds = pydicom.dcmread(written.path)  # a second ROI with the same contours: it overlaps the first everywhere
    for sequence, key in (("StructureSetROISequence", "ROINumber"), ("ROIContourSequence", "ReferencedROINumber")):
        item = copy.deepcopy(getattr(ds, sequence)[0])
        setattr(item, key, 2)
        getattr(ds, sequence).append(item)
    ds.StructureSetROISequence[1].ROIName = "liver copy"
    ds.save_as(tmp_path / "overlap.dcm")
    with pytest.raises(DicomError, match=rf"'liver' and 'liver copy' \({int(labels.sum())} voxels\)"):
        rasterise_rtstruct(tmp_path / "overlap.dcm", files)
    masks, names = rasterise_rtstruct_masks(tmp_path / "overlap.dcm", files)
    assert names == ["liver", "liver copy"]
    np.testing.assert_array_equal(masks[0], labels == 1)
    np.testing.assert_array_equal(masks[1], labels == 1)


def test_empty_label_map_writes_nothing(tmp_path):
    files = copy_series("ct_3slice", tmp_path / "ct")
    assert write_rtstruct(np.zeros((3, 512, 512), np.uint8), files, NAMES, tmp_path / "rt.dcm", model_id="m") is None
    assert not (tmp_path / "rt.dcm").exists()


def test_bad_input_is_named(tmp_path):
    ct = copy_series("ct_3slice", tmp_path / "ct")
    other = copy_series("rtstruct_ct", tmp_path / "other")
    rtstruct = dicom_data() / "rtstruct_ct" / "rtstruct.dcm"
    with pytest.raises(DicomError, match=r"drawn on series .* not on series"):
        rasterise_rtstruct(rtstruct, ct)
    with pytest.raises(DicomError, match=r"ct_1.dcm: not an RTSTRUCT \(modality CT\)"):
        rasterise_rtstruct(other[-1], other)
    with pytest.raises(DicomError, match="shape"):
        write_rtstruct(np.ones((3, 4, 4), np.uint8), ct, NAMES, tmp_path / "rt.dcm", model_id="m")
    moved = tmp_path / "moved.dcm"  # contours 100 mm above the series, referencing no slice of it
    ds = pydicom.dcmread(rtstruct)
    for contour in ds.ROIContourSequence[0].ContourSequence:
        del contour.ContourImageSequence
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        points[:, 2] += 100.0
        contour.ContourData = [float(v) for v in points.ravel()]
    ds.save_as(moved)
    with pytest.raises(DicomError, match=r"ROI 'ROI-1': a contour at 160.00 mm .* lies on no slice"):
        rasterise_rtstruct(moved, other)


def test_fill_polygon_fills_the_pixels_skimage_fills():
    rng = np.random.default_rng(0)
    for _ in range(200):  # random, also self-intersecting, polygons partly outside the slice
        n = int(rng.integers(3, 25))
        rows, columns = rng.uniform(-5, 35, n), rng.uniform(-5, 45, n)
        expected = np.zeros((30, 40), bool)
        expected[skimage.draw.polygon(rows, columns, shape=(30, 40))] = True
        np.testing.assert_array_equal(fill_polygon(rows, columns, 30, 40), expected)


def test_contours_through_pixel_centres_give_back_the_pixels(tmp_path):
    """Tools that trace the centres of boundary pixels (rt-utils, OpenCV) draw a ring as an outer contour through
    its outer boundary pixels and a hole contour through its inner ones; both lines of pixels belong to the ROI."""
    files = copy_series("ct_3slice", tmp_path / "ct")
    labels = np.zeros((3, 512, 512), np.uint8)
    labels[1, 100:120, 200:220] = 1
    labels[1, 105:115, 205:215] = 0
    written = write_rtstruct(labels, files, {1: "ring"}, tmp_path / "rt.dcm", model_id="m")
    ds = pydicom.dcmread(written.path)
    slices = read_source_slices(files)
    template = ds.ROIContourSequence[0].ContourSequence[0]
    contours = []
    for (r0, c0), (r1, c1) in (((100, 200), (119, 219)), ((104, 204), (115, 215))):
        contour = copy.deepcopy(template)
        xyz = slices.to_patient(1, np.array([r0, r0, r1, r1]), np.array([c0, c1, c1, c0]))
        contour.ContourData = [round(float(v), 4) for v in xyz.ravel()]
        contour.NumberOfContourPoints = 4
        contours.append(contour)
    ds.ROIContourSequence[0].ContourSequence = pydicom.Sequence(contours)
    ds.save_as(tmp_path / "centres.dcm")
    back, _ = rasterise_rtstruct(tmp_path / "centres.dcm", files)
    np.testing.assert_array_equal(back, labels)
