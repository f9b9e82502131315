"""Per-structure numbers of a label map: volume, voxel count, connected components, world bounding box and
the input intensity inside each structure (``medseg predict --statistics``).

For each foreground label id of the model (:func:`structure_statistics`):

- ``voxels``: how many voxels hold the label; ``volume_ml``: ``voxels`` x the voxel volume (product of the
  spacing, mm³) / 1000, i.e. mL (= cm³); for a 2D image the area in mm² / 1000 (a 1 mm thick slab).
- ``components``: connected components of the label's mask with **full connectivity**: voxels sharing a
  face, an edge or a vertex are connected (26 neighbours in 3D, 8 in 2D; :data:`CONNECTIVITY`).
- ``bbox_min_mm`` / ``bbox_max_mm``: the tightest axis-aligned box in world coordinates (mm, SimpleITK/LPS
  physical space, (x, y, z) order) around the structure's voxels, their faces included: the extremes over
  its voxels' corners (index +- 0.5) of ``origin + direction @ (spacing * index)``, index in (x, y, z)
  order. With an axis-aligned direction (identity, flips, axis swaps) these are the corners of its
  voxel-index box; with an oblique one each world coordinate, a linear function of the index, is minimised
  and maximised over the voxels themselves. (``instances.json`` of ``--instances`` boxes the voxel
  *centres* instead.) ``bbox_size_mm`` is ``max - min``.
- ``intensity_mean`` / ``intensity_std``: mean and population standard deviation (ddof 0) of the input
  image (first channel) over the structure's voxels, in the image's units (Hounsfield units for CT);
  None when the structure is absent or no image is given.

An absent label has ``voxels`` 0, ``volume_ml`` 0, ``components`` 0 and None for the box and intensities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.io.image import ImageGeometry, voxel_ml

__all__ = ["CONNECTIVITY", "StructureStatistics", "label_boxes", "structure_statistics", "world_box"]

#: How components are counted, for people: every neighbour (face, edge or vertex) connects.
CONNECTIVITY = "full: 26 neighbours in 3D, 8 in 2D (face, edge or vertex)"


@dataclass(frozen=True)
class StructureStatistics:
    """The numbers of one label of one case (see the module docstring for their definitions).

    Attributes:
        label: the original label id.
        name: its name (from the plan / dataset.json; ``label <id>`` when unknown).
        voxels: voxel count.
        volume_ml: volume in mL.
        components: number of connected components (full connectivity).
        bbox_min_mm: lower world corner, mm, (x, y, z); None when absent.
        bbox_max_mm: upper world corner, mm, (x, y, z); None when absent.
        bbox_size_mm: ``bbox_max_mm - bbox_min_mm``, mm; None when absent.
        intensity_mean: mean input intensity inside the structure; None when absent or without image.
        intensity_std: its population standard deviation; None likewise.
    """

    label: int
    name: str
    voxels: int
    volume_ml: float
    components: int
    bbox_min_mm: tuple[float, ...] | None
    bbox_max_mm: tuple[float, ...] | None
    bbox_size_mm: tuple[float, ...] | None
    intensity_mean: float | None
    intensity_std: float | None


def world_box(mask: np.ndarray, box: Sequence[slice], geometry: ImageGeometry) -> tuple[np.ndarray, np.ndarray]:
    """The tightest axis-aligned world box (mm) around the voxels of ``mask``, their faces included.

    Args:
        mask: boolean mask of a structure inside ``box`` (array order, the crop ``labels[box]``), not empty.
        box: the crop's slices in the whole image (array order).
        geometry: the whole image's geometry.

    Returns:
        ``(min, max)``: float64 ``(D,)`` world corners in SimpleITK (x, y, z) order.
    """
    ndim = geometry.ndim
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(ndim, ndim)[:, ::-1]  # columns: array axes
    steps = direction * np.asarray(geometry.spacing, dtype=np.float64)  # world mm per index step, (D, array axis)
    origin = np.asarray(geometry.origin, dtype=np.float64)
    half = 0.5 * np.abs(steps).sum(axis=1)  # how far a voxel's corners reach beyond its centre, per world axis
    if np.all(np.count_nonzero(np.abs(direction) > 1e-12, axis=1) == 1):  # axis-aligned: the index box's corners
        lo = np.array([s.start for s in box], dtype=np.float64)
        hi = np.array([s.stop - 1 for s in box], dtype=np.float64)
        ends = origin[:, None] + steps @ np.stack([lo, hi], 1)  # (D, 2): world position of both index corners
        return ends.min(axis=1) - half, ends.max(axis=1) + half
    grids = np.ix_(*(np.arange(s.start, s.stop, dtype=np.float64) for s in box))
    wmin, wmax = np.empty(ndim), np.empty(ndim)
    for a in range(ndim):  # one world axis at a time: a linear function of the index over the voxels
        values = sum(step * grid for step, grid in zip(steps[a], grids))[mask]
        wmin[a], wmax[a] = origin[a] + values.min() - half[a], origin[a] + values.max() + half[a]
    return wmin, wmax


def label_boxes(labels: np.ndarray) -> dict[int, tuple[slice, ...]]:
    """The index box of every non-zero label id present in ``labels`` (one pass over the array).

    Args:
        labels: integer label map ``(Z, Y, X)`` or ``(Y, X)``, ids >= 0.

    Returns:
        label id -> tuple of slices (array order) of the smallest box holding all its voxels.
    """
    boxes = ndimage.find_objects(labels.view(np.uint8) if labels.dtype == bool else labels)
    return {i + 1: box for i, box in enumerate(boxes) if box is not None}


def structure_statistics(
    labels: np.ndarray,
    geometry: ImageGeometry,
    label_ids: Sequence[int],
    names: Mapping[int, str] | None = None,
    intensity: np.ndarray | None = None,
) -> list[StructureStatistics]:
    """The statistics of every foreground label of ``label_ids`` (absent ones included, with zeros).

    Args:
        labels: integer label map ``(Z, Y, X)`` (or ``(Y, X)``), original label ids, 0 = background.
        geometry: its geometry (spacing in mm, origin, direction).
        label_ids: the model's label ids (background 0 is left out of the result); ids present in
            ``labels`` but missing here are appended, named ``label <id>``.
        names: label id -> name.
        intensity: the input image on the same grid (first channel), any real dtype; None: no intensities.

    Returns:
        One :class:`StructureStatistics` per foreground label, in ascending id order.

    Raises:
        MedsegError: ``labels`` is not an integer array of ``geometry``'s shape with ids >= 0, or
            ``intensity`` has another shape.
    """
    if labels.dtype.kind not in "iub" or tuple(labels.shape) != tuple(geometry.shape):
        raise MedsegError(
            f"a label map of integer ids with shape {list(geometry.shape)} is needed, got {labels.dtype} "
            f"{list(labels.shape)}"
        )
    if labels.dtype.kind == "i" and labels.size and int(labels.min()) < 0:
        raise MedsegError(f"label ids must be >= 0, found {int(labels.min())}")
    if intensity is not None and tuple(intensity.shape) != tuple(labels.shape):
        raise MedsegError(f"the image has shape {list(intensity.shape)}, the label map {list(labels.shape)}")
    names = names or {}
    boxes = label_boxes(labels)
    ids = sorted({int(i) for i in label_ids if int(i) != 0} | set(boxes))
    voxel_volume = voxel_ml(geometry.spacing)
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    out = []
    for label in ids:
        name = names.get(label, f"label {label}")
        box = boxes.get(label)
        if box is None:
            out.append(StructureStatistics(label, name, 0, 0.0, 0, None, None, None, None, None))
            continue
        mask = labels[box] == label
        voxels = int(np.count_nonzero(mask))
        _, components = ndimage.label(mask, structure=structure)
        wmin, wmax = world_box(mask, box, geometry)
        mean = std = None
        if intensity is not None:
            values = intensity[box][mask].astype(np.float64)
            mean, std = float(values.mean()), float(values.std())
        out.append(
            StructureStatistics(
                label=label,
                name=name,
                voxels=voxels,
                volume_ml=voxels * voxel_volume,
                components=int(components),
                bbox_min_mm=tuple(float(v) for v in wmin),
                bbox_max_mm=tuple(float(v) for v in wmax),
                bbox_size_mm=tuple(float(v) for v in wmax - wmin),
                intensity_mean=mean,
                intensity_std=std,
            )
        )
    return out
