"""Preprocessing one case: map labels, crop, normalise, resample, sample foreground locations."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.io.codec import from_json_dict, to_json_dict
from medseg.io.image import ImageGeometry
from medseg.planning.plan import ConfigurationPlan, Plan
from medseg.preprocessing.cropping import crop_to_nonzero
from medseg.preprocessing.intensity import class_intensity_stats
from medseg.preprocessing.labels import case_seed, labels_to_classes, locations_to_dict, sample_class_locations_array
from medseg.preprocessing.normalization import normalize
from medseg.preprocessing.resampling import compute_new_shape, resample_image, resample_segmentation

logger = logging.getLogger(__name__)

#: Bumped whenever the preprocessed output for the same plan would change; part of the fingerprint.
PREPROCESSING_VERSION = 1


@dataclass(frozen=True)
class CaseProperties:
    """Everything needed to map a prediction on the preprocessed grid back onto the original scan.

    All grids are 3D ``(Z, Y, X)``; a 2D image (``geometry.shape == (Y, X)``) is handled as one slice
    (``Z = 1``) and mapped back to ``(Y, X)`` by :func:`~medseg.preprocessing.revert_to_original`.

    Attributes:
        case_id: case identifier.
        geometry: geometry of the original image (shape, spacing, origin, direction), kept exactly.
        bbox: crop to the nonzero region, ``(start, stop)`` per axis ``(Z, Y, X)`` in the original grid.
        shape_after_crop: ``(Z, Y, X)`` shape of the cropped image.
        shape_after_resample: ``(z, y, x)`` shape of the preprocessed arrays.
        spacing_after_resample: effective spacing of the preprocessed grid in mm
            (``spacing * shape_after_crop / shape_after_resample``; equals the plan spacing up to rounding of
            the shape).
        class_locations: class index -> up to 10000 sampled voxel coordinates ``[z, y, x]`` in the
            preprocessed grid (empty list when the class is absent; empty dict without a label).
        fingerprint: :func:`preprocessing_fingerprint` of the configuration that produced the case.
        class_intensity: foreground class index -> ``[mean, std]`` per channel of the normalised intensities
            inside the class (:func:`~medseg.preprocessing.intensity.class_intensity_stats`; empty without a
            label, and in caches written before the field existed).
    """

    case_id: str
    geometry: ImageGeometry
    bbox: tuple[tuple[int, int], ...]
    shape_after_crop: tuple[int, ...]
    shape_after_resample: tuple[int, ...]
    spacing_after_resample: tuple[float, ...]
    class_locations: dict[int, list[list[int]]] = field(default_factory=dict)
    fingerprint: str = ""
    class_intensity: dict[int, list[list[float]]] = field(default_factory=dict)

    def to_dict(self, include_class_locations: bool = True) -> dict[str, Any]:
        """JSON-ready dict of Python builtins (``class_locations`` left out when not ``include_class_locations``)."""
        d = to_json_dict(self)
        if not include_class_locations:
            del d["class_locations"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "case properties") -> CaseProperties:
        """Inverse of :meth:`to_dict` (missing ``class_locations`` give an empty dict).

        Raises:
            MedsegError: unknown or missing keys, values of the wrong type (each named by its dotted path).
        """
        return from_json_dict(cls, d, where, MedsegError)


def preprocessing_fingerprint(plan: Plan, config: str | ConfigurationPlan) -> str:
    """Hash of what determines a configuration's preprocessed data.

    Target spacing, normalisation, label ids (and the ignore label, when there is one) and
    :data:`PREPROCESSING_VERSION`. Two configurations with the same fingerprint (usually ``2d`` and
    ``3d_fullres``) share their preprocessed data.
    """
    cfg = plan.configuration(config) if isinstance(config, str) else config
    payload = {
        "version": PREPROCESSING_VERSION,
        "spacing": [float(s) for s in cfg.spacing],
        "normalization": [asdict(n) for n in cfg.normalization],
        "label_ids": [int(i) for i in plan.label_ids],
    }
    if plan.ignore_label is not None:  # absent otherwise, so caches made before ignore labels stay valid
        payload["ignore_label"] = int(plan.ignore_label)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def spacing_3d(geometry: ImageGeometry, target_spacing: tuple[float, ...]) -> tuple[float, ...]:
    """Original spacing ``(Z, Y, X)``; a 2D image gets the target's Z spacing (one slice, never resampled in Z)."""
    if geometry.ndim == 2:
        return (float(target_spacing[0]),) + tuple(float(s) for s in geometry.spacing)
    return tuple(float(s) for s in geometry.spacing)


def preprocess_case(
    image: np.ndarray,
    geometry: ImageGeometry,
    label: np.ndarray | None,
    plan: Plan,
    config: str,
    case_id: str = "",
) -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """Crop, normalise and resample one case for ``config``.

    Args:
        image: raw intensities ``(C, Z, Y, X)`` (``(C, Y, X)`` for a 2D image), any real dtype.
        geometry: the image's geometry (from :func:`medseg.io.image.read_channels`).
        label: raw label ids ``(Z, Y, X)`` (original ids, e.g. 0, 1, 2, 5, 117) or None.
        plan: the plan; ``plan.label_ids`` maps ids to class indices.
        config: configuration name (its ``spacing`` and ``normalization`` are used).
        case_id: case identifier (seeds the foreground sampling; names the case in errors).

    Returns:
        ``(data, seg, props)``: ``data`` float32 ``(C, z, y, x)`` normalised intensities; ``seg`` class
        indices ``(z, y, x)`` (int8 when K <= 127, else int16; ``plan.ignore_label`` voxels hold
        ``plan.ignore_class`` = K) or None; :class:`CaseProperties`.

    Raises:
        MedsegError: shapes of image, geometry and label disagree, or the label holds undeclared ids.
        PlanError: the configuration is not in the plan or its normalisation does not fit the image.
    """
    data, seg, props, locations = preprocess_case_arrays(image, geometry, label, plan, config, case_id)
    if locations is not None:
        props = dataclasses.replace(props, class_locations=locations_to_dict(locations, plan.num_classes))
    return data, seg, props


def preprocess_case_arrays(
    image: np.ndarray, geometry: ImageGeometry, label: np.ndarray | None, plan: Plan, config: str, case_id: str = ""
) -> tuple[np.ndarray, np.ndarray | None, CaseProperties, np.ndarray | None]:
    """:func:`preprocess_case` with the class locations as one int32 array of ``[class, z, y, x]`` rows.

    ``props.class_locations`` is left empty; the fourth value (None without a label) holds the locations
    (see :func:`medseg.preprocessing.labels.locations_to_dict`). Used for storage, where lists are wasteful.
    """
    cfg = plan.configuration(config)
    where = case_id or "case"
    if image.ndim != geometry.ndim + 1 or tuple(image.shape[1:]) != tuple(geometry.shape):
        raise MedsegError(
            f"{where}: image array shape {list(image.shape)} does not match (C, *{list(geometry.shape)}) of its geometry"
        )
    if label is not None and tuple(label.shape) != tuple(geometry.shape):
        raise MedsegError(f"{where}: label shape {list(label.shape)} differs from image shape {list(geometry.shape)}")
    if geometry.ndim == 2:
        image = image[:, None]
        label = None if label is None else label[None]
    elif geometry.ndim != 3:
        raise MedsegError(f"{where}: only 2D and 3D images are supported, got {geometry.ndim}D")

    classes = (
        None
        if label is None
        else labels_to_classes(label, plan.label_ids, source=where, ignore_label=plan.ignore_label)
    )
    data, seg, mask, bbox = crop_to_nonzero(image, classes)
    if classes is not None and seg is not None:
        k = plan.num_classes  # the ignore class K is no label
        lost = int(np.count_nonzero((classes > 0) & (classes < k))) - int(np.count_nonzero((seg > 0) & (seg < k)))
        if lost:
            logger.warning(
                "%s: %d labelled voxels lie outside the image's nonzero region and are cropped away", where, lost
            )
    shape_after_crop = tuple(int(s) for s in data.shape[1:])

    data = normalize(data, cfg.normalization, mask)
    spacing = spacing_3d(geometry, cfg.spacing)
    new_shape = compute_new_shape(shape_after_crop, spacing, cfg.spacing)
    data = resample_image(data, new_shape, spacing, cfg.spacing)
    if seg is not None:
        seg = resample_segmentation(seg, new_shape, spacing, cfg.spacing)
    effective = tuple(sp * n / m for sp, n, m in zip(spacing, shape_after_crop, new_shape))

    locations = None if seg is None else sample_class_locations_array(seg, plan.num_classes, case_seed(case_id))
    props = CaseProperties(
        case_id=case_id,
        geometry=geometry,
        bbox=bbox,
        shape_after_crop=shape_after_crop,
        shape_after_resample=tuple(int(s) for s in new_shape),
        spacing_after_resample=effective,
        fingerprint=preprocessing_fingerprint(plan, cfg),
        class_intensity={} if seg is None else class_intensity_stats(data, seg, plan.num_classes),
    )
    seg = None if seg is None else np.ascontiguousarray(seg)
    return np.ascontiguousarray(data, dtype=np.float32), seg, props, locations
