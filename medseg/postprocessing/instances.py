"""Instance maps from semantic label maps: one id per object, and a table of the objects in world coordinates.

**Algorithm** (:func:`find_instances`), for each foreground label id in ascending order:

1. Connected components of the label's mask (:func:`scipy.ndimage.label`) with ``connectivity`` 1, 2 or 3:
   neighbours sharing a face (6 in 3D, 4 in 2D), also an edge (18 in 3D, 8 in 2D) or also a vertex (26 in
   3D; in 2D 3 acts as 2). Default 3, as in :mod:`~medseg.postprocessing.operations`.
2. Optionally (``split_touching``), each component is split into touching objects by a marker watershed
   (:func:`split_component`): the Euclidean distance transform of the component in mm (anisotropic
   spacing honoured) peaks at the centres of round objects and dips at the neck where two touch. Seeds
   are its regional maxima that rise at least ``min_depth_mm`` above the saddle to any higher maximum
   (h-maxima, :func:`skimage.morphology.h_maxima`; default one largest voxel spacing, which discards the
   ripples of a discretised ridge), thinned greedily, highest first, so that kept seeds are at least
   ``min_separation_mm`` apart (between their highest voxels, in mm). With two seeds or more, the
   component is flooded from them (:func:`skimage.segmentation.watershed`, same connectivity) on the
   elevation ``-distance`` or, when the class probabilities are known, ``-distance x probability``, so the
   dividing line also follows valleys of the probability between the objects. Every voxel of the component
   goes to exactly one part; a component with fewer than two seeds stays whole.
3. Objects get consecutive ids from 1 in that order (label, then component scan order, then seed height);
   0 is background.

**Table** (:class:`Instance`): per object its label id, voxel count, volume in mL (voxels x voxel volume),
centroid (mean of its voxel centres) and bounding box in mm in world coordinates (SimpleITK/LPS physical
space: ``origin + direction @ (spacing * index)`` with the index in (x, y, z) order), and its score: the
mean probability of its label over its voxels (None without probabilities). The box is the axis-aligned
world box of the corners of its voxel-index box (voxel centres), so with an oblique direction it encloses
the object's voxel centres but is not the tightest box around them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from medseg.errors import MedsegError
from medseg.io.image import ImageGeometry, voxel_ml

__all__ = [
    "Instance",
    "InstanceOptions",
    "find_instances",
    "index_to_world",
    "split_component",
]

#: Mean probability of one label id over the image, float ``(Z, Y, X)`` in [0, 1].
LabelProbability = Callable[[int], np.ndarray]


@dataclass(frozen=True)
class InstanceOptions:
    """How label maps become instance maps (see the module docstring).

    Attributes:
        connectivity: 1 (faces), 2 (also edges) or 3 (also vertices) neighbours are connected.
        split_touching: split touching objects of one component by a distance-transform watershed.
        min_separation_mm: the smallest distance between the seeds of two objects, in mm.
        min_depth_mm: how far a seed's distance-transform peak must rise above the saddle to a higher one,
            in mm; None = the largest voxel spacing of the image.
    """

    connectivity: int = 3
    split_touching: bool = False
    min_separation_mm: float = 10.0
    min_depth_mm: float | None = None

    def __post_init__(self) -> None:
        if self.connectivity not in (1, 2, 3):
            raise MedsegError(
                f"instance connectivity must be 1 (faces), 2 (edges) or 3 (vertices), got {self.connectivity!r}"
            )
        if not self.min_separation_mm > 0:
            raise MedsegError(f"the minimum separation of instances must be > 0 mm, got {self.min_separation_mm!r}")
        if self.min_depth_mm is not None and not self.min_depth_mm > 0:
            raise MedsegError(f"the minimum seed depth must be > 0 mm, got {self.min_depth_mm!r}")


@dataclass(frozen=True)
class Instance:
    """One object of an instance map.

    Attributes:
        id: its value in the instance map (1, 2, ...).
        label: the original label id of its class.
        voxels: its number of voxels.
        volume_ml: its volume in mL (= cm³); for a 2D image its area in mm² / 1000 (a 1 mm thick slab).
        centroid_mm: mean world position of its voxel centres, mm, (x, y, z) (SimpleITK physical space).
        bbox_min_mm: lower corner of its world bounding box, mm, (x, y, z).
        bbox_max_mm: upper corner, mm, (x, y, z).
        score: mean probability of ``label`` over its voxels; None when no probabilities were given.
    """

    id: int
    label: int
    voxels: int
    volume_ml: float
    centroid_mm: tuple[float, ...]
    bbox_min_mm: tuple[float, ...]
    bbox_max_mm: tuple[float, ...]
    score: float | None


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    return ndimage.generate_binary_structure(ndim, min(connectivity, ndim))


def index_to_world(index: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """World positions (mm) of array indices.

    Args:
        index: ``(N, D)`` continuous array indices in array order (``(z, y, x)`` for 3D).
        geometry: the image's geometry.

    Returns:
        ``(N, D)`` float64 physical points in SimpleITK (x, y, z) order.
    """
    ndim = geometry.ndim
    xyz = np.asarray(index, dtype=np.float64)[:, ::-1] * np.asarray(geometry.spacing[::-1], dtype=np.float64)
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(ndim, ndim)
    out: np.ndarray = xyz @ direction.T + np.asarray(geometry.origin, dtype=np.float64)
    return out


def split_component(
    mask: np.ndarray,
    spacing: Sequence[float],
    options: InstanceOptions,
    probability: np.ndarray | None = None,
) -> np.ndarray:
    """Split one connected object into touching parts by a distance-transform watershed.

    Args:
        mask: boolean ``(Z, Y, X)`` (or ``(Y, X)``) mask of one connected component.
        spacing: voxel size in mm, same axis order.
        options: connectivity, ``min_separation_mm`` and ``min_depth_mm`` (see the module docstring).
        probability: the probability of the component's class on the same grid, or None.

    Returns:
        int32 map of the same shape: 0 outside ``mask``, parts 1..n inside (n = 1 when it is not split).
    """
    padded = np.pad(mask, 1)  # the array edge counts as outside the object
    dist = ndimage.distance_transform_edt(padded, sampling=tuple(float(s) for s in spacing))
    depth = options.min_depth_mm if options.min_depth_mm is not None else float(max(spacing))
    full = _structure(mask.ndim, mask.ndim)
    peaks, n_peaks = ndimage.label(h_maxima(dist, depth, footprint=full), structure=full)
    whole = mask.astype(np.int32)
    if n_peaks < 2:
        return whole
    tops = ndimage.maximum_position(dist, peaks, index=np.arange(1, n_peaks + 1))
    heights = np.asarray([dist[t] for t in tops])
    scale = np.asarray(spacing, dtype=np.float64)
    kept: list[tuple[int, ...]] = []
    for i in np.argsort(-heights, kind="stable"):
        top = tuple(int(v) for v in tops[i])
        if all(np.linalg.norm((np.subtract(top, k)) * scale) >= options.min_separation_mm for k in kept):
            kept.append(top)
    if len(kept) < 2:
        return whole
    markers = np.zeros(padded.shape, dtype=np.int32)
    for n, top in enumerate(kept, start=1):
        markers[top] = n
    elevation = -dist if probability is None else -dist * np.pad(probability.astype(np.float64), 1)
    parts = watershed(elevation, markers, mask=padded, connectivity=min(options.connectivity, mask.ndim))
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    return np.asarray(parts[inner], dtype=np.int32)


def find_instances(
    labels: np.ndarray,
    geometry: ImageGeometry,
    options: InstanceOptions | None = None,
    probability: LabelProbability | None = None,
) -> tuple[np.ndarray, list[Instance]]:
    """The instance map of a label map and the table of its objects (algorithm: module docstring).

    Args:
        labels: original label ids ``(Z, Y, X)`` (or ``(Y, X)``), 0 = background.
        geometry: the label map's geometry (shape must match; spacing in mm).
        options: how to separate objects (default :class:`InstanceOptions`).
        probability: label id -> its probability ``(Z, Y, X)`` in [0, 1], or None: used for the scores and,
            with ``split_touching``, for the watershed elevation. Called once per label present.

    Returns:
        ``(instances, table)``: instance ids (uint16, or uint32 beyond 65535 objects; 0 = background) of
        ``labels``' shape, and one :class:`Instance` per id in id order.

    Raises:
        MedsegError: ``labels`` does not have the geometry's shape.
    """
    options = options or InstanceOptions()
    labels = np.asarray(labels)
    if labels.shape != tuple(geometry.shape):
        raise MedsegError(f"label map of shape {list(labels.shape)} but geometry of shape {list(geometry.shape)}")
    ids = np.zeros(labels.shape, dtype=np.uint32)
    table: list[Instance] = []
    structure = _structure(labels.ndim, options.connectivity)
    voxel_volume = voxel_ml(geometry.spacing)
    for label in (int(v) for v in np.unique(labels) if v != 0):
        prob = None if probability is None else probability(label)
        comps, n = ndimage.label(labels == label, structure=structure)
        for region, box in enumerate(ndimage.find_objects(comps), start=1):
            if box is None:
                continue
            local = comps[box] == region
            if options.split_touching:
                parts = split_component(local, geometry.spacing, options, None if prob is None else prob[box])
            else:
                parts = local.astype(np.int32)
            for part in range(1, int(parts.max()) + 1):
                where = np.nonzero(parts == part)
                new_id = len(table) + 1
                ids[box][where] = new_id
                table.append(_describe(new_id, label, where, box, geometry, voxel_volume, prob))
        del comps, prob
    dtype = np.uint16 if len(table) <= np.iinfo(np.uint16).max else np.uint32
    return ids.astype(dtype), table


def _describe(
    new_id: int,
    label: int,
    where: tuple[np.ndarray, ...],
    box: tuple[slice, ...],
    geometry: ImageGeometry,
    voxel_volume: float,
    prob: np.ndarray | None,
) -> Instance:
    """The :class:`Instance` of the voxels ``where`` (indices within the crop ``box``)."""
    index = np.stack([w + s.start for w, s in zip(where, box)], axis=1)
    lo, hi = index.min(axis=0), index.max(axis=0)
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(len(lo), -1).T
    world = index_to_world(corners, geometry)
    centroid = index_to_world(index.mean(axis=0, dtype=np.float64)[None], geometry)[0]
    score = None if prob is None else float(np.mean(prob[box][where], dtype=np.float64))
    return Instance(
        id=new_id,
        label=label,
        voxels=int(index.shape[0]),
        volume_ml=index.shape[0] * voxel_volume,
        centroid_mm=tuple(float(v) for v in centroid),
        bbox_min_mm=tuple(float(v) for v in world.min(axis=0)),
        bbox_max_mm=tuple(float(v) for v in world.max(axis=0)),
        score=score,
    )
