"""Image I/O keeps origin, spacing and direction exactly and writes atomically."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.io.image import ImageGeometry, read_channels, read_image, write_image


def _oblique_image(shape_xyz=(7, 6, 5)) -> sitk.Image:
    arr = np.arange(np.prod(shape_xyz[::-1]), dtype=np.float32).reshape(shape_xyz[::-1])
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 1.3, 3.1))
    img.SetOrigin((12.5, -40.25, 7.0))
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    return img


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_round_trip_keeps_geometry(tmp_path, suffix):
    src = tmp_path / f"img{suffix}"
    sitk.WriteImage(_oblique_image(), str(src))
    arr, geo = read_image(src)
    assert arr.shape == (5, 6, 7)
    assert geo.spacing == pytest.approx((3.1, 1.3, 0.7))
    out = tmp_path / "out" / f"copy{suffix}"
    write_image(arr, geo, out)
    arr2, geo2 = read_image(out)
    np.testing.assert_array_equal(arr, arr2)
    assert geo2.matches(geo, tol=1e-6) == []
    assert ImageGeometry.from_dict(geo.to_dict()) == geo
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_unreadable_file_names_it(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(MedsegError, match="broken.nii.gz"):
        read_image(bad)
    with pytest.raises(MedsegError, match="not found"):
        read_image(tmp_path / "nope.nii.gz")


def test_read_channels_stacks_and_checks_shape(tmp_path):
    a, b = tmp_path / "c_0000.nii.gz", tmp_path / "c_0001.nii.gz"
    sitk.WriteImage(_oblique_image(), str(a))
    sitk.WriteImage(_oblique_image(), str(b))
    data, geo = read_channels([a, b])
    assert data.shape == (2, 5, 6, 7) and data.dtype == np.float32
    sitk.WriteImage(_oblique_image((7, 6, 4)), str(b))
    with pytest.raises(MedsegError, match="c_0001"):
        read_channels([a, b])


def test_geometry_mismatch_is_described():
    g = ImageGeometry((2, 3, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    h = ImageGeometry((2, 3, 4), (1.0, 1.0, 1.5), (0.0, 0.0, 5.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    diffs = g.matches(h)
    assert any("spacing" in d for d in diffs) and any("origin" in d for d in diffs)


def test_write_like_is_bit_exact_for_oblique_nifti(tmp_path):
    src = tmp_path / "src.nii.gz"
    sitk.WriteImage(_oblique_image(), str(src))
    ref = sitk.ReadImage(str(src))
    seg = (sitk.GetArrayFromImage(ref) > 50).astype(np.uint8)
    from medseg.io.image import write_like

    out = tmp_path / "o" / "seg.nii.gz"
    write_like(seg, src, out)
    back = sitk.ReadImage(str(out))
    assert back.GetDirection() == ref.GetDirection()
    assert back.GetOrigin() == ref.GetOrigin()
    assert back.GetSpacing() == ref.GetSpacing()
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), seg)
    with pytest.raises(ValueError):
        write_like(seg[:-1], src, out)
