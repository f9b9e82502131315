"""Cropping to the nonzero region of an image.

Scans often carry a large frame of exact zeros (skull-stripped MRI, padded crops). Removing it before
resampling and training saves memory and compute without changing anything the network can see. The
nonzero region is the union over channels of voxels ``!= 0``, with enclosed holes filled (a zero voxel
surrounded by tissue is still part of the body), and the crop is its bounding box.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BBox = tuple[tuple[int, int], ...]


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """Mask of the nonzero region: any channel ``!= 0``, holes filled.

    Args:
        image: ``(C, Z, Y, X)`` intensities.

    Returns:
        bool ``(Z, Y, X)``.
    """
    mask = np.any(image != 0, axis=0)
    if mask.all() or not mask.any():
        return mask
    return ndimage.binary_fill_holes(mask)


def bounding_box(mask: np.ndarray) -> BBox:
    """Bounding box of the True voxels of ``mask`` as ``(start, stop)`` per axis (stop exclusive).

    An empty mask gives the whole array, so an all-zero image is kept rather than cropped to nothing.
    """
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other)) if other else np.flatnonzero(mask)
        if hit.size == 0:
            return tuple((0, int(s)) for s in mask.shape)
        bbox.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(bbox)


def crop(array: np.ndarray, bbox: BBox) -> np.ndarray:
    """Crop the trailing ``len(bbox)`` axes of ``array`` to ``bbox`` (leading axes, e.g. channels, kept)."""
    lead = (slice(None),) * (array.ndim - len(bbox))
    return array[lead + tuple(slice(a, b) for a, b in bbox)]


def crop_to_nonzero(
    image: np.ndarray, label: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, BBox]:
    """Crop an image (and its label) to the bounding box of the image's nonzero region.

    Args:
        image: ``(C, Z, Y, X)`` intensities.
        label: ``(Z, Y, X)`` label map or None.

    Returns:
        ``(image_cropped, label_cropped, mask_cropped, bbox)``; ``mask_cropped`` is the hole-filled nonzero
        mask inside the crop (bool ``(z, y, x)``), ``bbox`` the crop in the original grid.
    """
    mask = nonzero_mask(image)
    bbox = bounding_box(mask)
    return (
        np.ascontiguousarray(crop(image, bbox)),
        None if label is None else np.ascontiguousarray(crop(label, bbox)),
        np.ascontiguousarray(crop(mask, bbox)),
        bbox,
    )
