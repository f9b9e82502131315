"""Dataset fingerprint: the per-case and dataset-wide facts the planner decides from.

The fingerprint is computed once per dataset (``medseg plan`` saves it as ``WORK/fingerprint.json``) and
holds, per case, the voxel spacing, the image shape before and after cropping to the nonzero region, and
per class the voxel count and connected-component sizes; per channel, intensity statistics of the
foreground (``label > 0``) voxels, sampled from every case with a fixed seed and pooled over the dataset.
Voxels of the dataset's ignore label (partial annotation) count as unlabelled: they are neither a class
nor foreground.

Conventions: shapes and spacings in array order ``(Z, Y, X)`` (``(Y, X)`` for 2D images), spacing in mm.
Class statistics are keyed by the *original* label ids of the dataset (not the internal class indices).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.fingerprint.image_statistics import image_percentiles
from medseg.io.codec import from_json_dict, to_json_dict
from medseg.io.image import atomic_write_text, read_channels, read_image
from medseg.io.json_files import load_json_file, parse_json
from medseg.io.parallel import map_cases

if TYPE_CHECKING:
    from medseg.io.dataset import Case, DatasetInfo

logger = logging.getLogger(__name__)

FINGERPRINT_SCHEMA_VERSION = 1
DEFAULT_SAMPLES_PER_CASE = 10_000
DEFAULT_SEED = 1234

#: top-level keys of fingerprint.json, in the order they are written
_JSON_ORDER = (
    "schema_version",
    "dataset_name",
    "channel_names",
    "label_ids",
    "ignore_label",
    "samples_per_case",
    "seed",
    "intensity",
    "cases",
)


@dataclass(frozen=True)
class CaseFingerprint:
    """Facts about one training case.

    Attributes:
        case_id: the case identifier.
        spacing: voxel size in mm, ``(Z, Y, X)`` (``(Y, X)`` for 2D images).
        shape: image shape as stored, same order as ``spacing``.
        shape_after_crop: shape of the bounding box of the nonzero region (any channel ``!= 0``).
        relative_size_after_crop: voxels kept by cropping / voxels before, in ``(0, 1]``.
        class_voxel_counts: original label id -> number of voxels (foreground classes only, absent = 0).
        class_component_sizes: original label id -> sizes (voxels) of its connected components
            (face connectivity), largest first.
        class_centroids: original label id -> centre of mass of its voxels in voxel indices of the
            stored array, same order as ``shape`` (used to find axes along which classes always lie in
            the same order, see :mod:`medseg.planning.mirroring`).
        image_percentiles: per channel, the whole image's 0.5/50/99.5th percentiles (:func:`image_percentiles`).
        direction: direction cosines (SimpleITK order, row-major). Both empty in older fingerprints.
    """

    case_id: str
    spacing: tuple[float, ...]
    shape: tuple[int, ...]
    shape_after_crop: tuple[int, ...]
    relative_size_after_crop: float
    class_voxel_counts: dict[int, int] = field(default_factory=dict)
    class_component_sizes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    class_centroids: dict[int, tuple[float, ...]] = field(default_factory=dict)
    image_percentiles: tuple[tuple[float, float, float], ...] = ()
    direction: tuple[float, ...] = ()


@dataclass(frozen=True)
class IntensityStats:
    """Foreground intensity statistics of one channel, pooled over the sampled voxels of all cases.

    All values are in the image's own units (e.g. Hounsfield units for CT). With no foreground voxels in
    the dataset every value is NaN and ``num_samples`` is 0.
    """

    mean: float
    std: float
    median: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float
    num_samples: int

    @classmethod
    def from_samples(cls, values: np.ndarray) -> IntensityStats:
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            nan = float("nan")
            return cls(nan, nan, nan, nan, nan, nan, nan, 0)
        p005, p50, p995 = np.percentile(v, [0.5, 50.0, 99.5])
        return cls(
            mean=float(v.mean()),
            std=float(v.std()),
            median=float(p50),
            min=float(v.min()),
            max=float(v.max()),
            percentile_00_5=float(p005),
            percentile_99_5=float(p995),
            num_samples=int(v.size),
        )

    def to_dict(self) -> dict[str, Any]:
        """The statistics as JSON builtins; JSON has no NaN, so "no foreground" is written as null."""
        d: dict[str, Any] = to_json_dict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

    @staticmethod
    def nan_for_null(d: Any) -> Any:
        """``d`` (builtins of :meth:`to_dict`) with null values read back as NaN (other values unchanged)."""
        return {k: float("nan") if v is None else v for k, v in d.items()} if isinstance(d, dict) else d


@dataclass(frozen=True)
class Fingerprint:
    """Fingerprint of a whole dataset.

    Attributes:
        dataset_name: from dataset.json.
        channel_names: one per input channel.
        label_ids: original label ids, background 0 first.
        cases: one :class:`CaseFingerprint` per training case, in dataset order.
        intensity: one :class:`IntensityStats` per channel (foreground voxels, pooled over cases).
        samples_per_case: at most this many foreground voxels were sampled per case for ``intensity``.
        seed: seed of that sampling.
        ignore_label: the dataset's ignore label id (not in ``label_ids``, not counted anywhere), or None.
    """

    dataset_name: str
    channel_names: tuple[str, ...]
    label_ids: tuple[int, ...]
    cases: tuple[CaseFingerprint, ...]
    intensity: tuple[IntensityStats, ...]
    samples_per_case: int = DEFAULT_SAMPLES_PER_CASE
    seed: int = DEFAULT_SEED
    schema_version: int = FINGERPRINT_SCHEMA_VERSION
    ignore_label: int | None = None

    # ------------------------------------------------------------ derived quantities
    @property
    def num_cases(self) -> int:
        return len(self.cases)

    @property
    def ndim(self) -> int:
        """Spatial dimensionality of the images (3, or 2 when every image is 2D)."""
        return max(len(c.shape) for c in self.cases)

    def spacings(self) -> np.ndarray:
        """Per-case spacings, float64 ``(num_cases, ndim)`` in mm."""
        return np.array([c.spacing for c in self.cases], dtype=np.float64)

    def shapes_after_crop(self) -> np.ndarray:
        """Per-case shapes after cropping, float64 ``(num_cases, ndim)``."""
        return np.array([c.shape_after_crop for c in self.cases], dtype=np.float64)

    def median_spacing(self) -> tuple[float, ...]:
        return tuple(float(v) for v in np.median(self.spacings(), axis=0))

    def median_shape_after_crop(self) -> tuple[float, ...]:
        return tuple(float(v) for v in np.median(self.shapes_after_crop(), axis=0))

    def median_relative_size_after_crop(self) -> float:
        return float(np.median([c.relative_size_after_crop for c in self.cases]))

    # ------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """The fingerprint as JSON builtins (:mod:`medseg.io.codec`), keys in the order fingerprint.json has."""
        d: dict[str, Any] = to_json_dict(self)
        d["intensity"] = [s.to_dict() for s in self.intensity]
        return {k: d[k] for k in _JSON_ORDER}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fingerprint:
        """Fingerprint from the builtins of :meth:`to_dict`.

        Raises:
            MedsegError: not an object, an unsupported ``schema_version``, or malformed entries (unknown
                or missing keys, values of the wrong type), each named by its path.
        """
        if not isinstance(d, dict):
            raise MedsegError(f"fingerprint: expected a JSON object, got {type(d).__name__}")
        version = d.get("schema_version")
        if version != FINGERPRINT_SCHEMA_VERSION:
            raise MedsegError(
                f"fingerprint schema_version {version!r} is not supported (expected {FINGERPRINT_SCHEMA_VERSION}); "
                "delete fingerprint.json and re-run `medseg plan`"
            )
        data = dict(d)
        if isinstance(data.get("intensity"), list):
            data["intensity"] = [IntensityStats.nan_for_null(s) for s in data["intensity"]]
        return from_json_dict(cls, data, "fingerprint", MedsegError)

    @classmethod
    def from_json(cls, text: str) -> Fingerprint:
        return cls.from_dict(parse_json(text, "fingerprint"))

    def save(self, path: str | Path) -> None:
        """Write as JSON, atomically."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Fingerprint:
        return load_json_file(path, cls.from_dict, "fingerprint", missing="fingerprint file not found")


# ---------------------------------------------------------------- extraction
def nonzero_bbox(image: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the voxels where any channel is nonzero.

    Args:
        image: ``(C, *spatial)``.

    Returns:
        one slice per spatial axis; the whole image when every voxel is zero.
    """
    mask = np.any(image != 0, axis=0)
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other)) if other else np.flatnonzero(mask)
        if hit.size == 0:
            return tuple(slice(0, s) for s in mask.shape)
        out.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(out)


def class_statistics(
    label: np.ndarray,
) -> tuple[dict[int, int], dict[int, tuple[int, ...]], dict[int, tuple[float, ...]]]:
    """Voxel count, connected-component sizes and centre of mass of every foreground label value in ``label``.

    Components and centres are computed inside each class's bounding box (cheap for many small structures).

    Args:
        label: integer label map ``(Z, Y, X)`` (or ``(Y, X)``) with original ids.

    Returns:
        ``(counts, component_sizes, centroids)`` keyed by label id (> 0); sizes largest first; centroids in
        voxel indices of ``label``, one float per axis.
    """
    lab = np.asarray(label)
    if not np.issubdtype(lab.dtype, np.integer):
        lab = np.rint(lab).astype(np.int64)
    small_ids = lab.size > 0 and lab.min() >= 0 and lab.max() < 2**16
    if small_ids:  # the usual case: bincount is much cheaper than sorting
        counts = np.bincount(lab.ravel().astype(np.intp, copy=False))
        voxel_counts = {int(i): int(counts[i]) for i in np.flatnonzero(counts) if i > 0}
    else:
        ids, counts = np.unique(lab, return_counts=True)
        voxel_counts = {int(i): int(c) for i, c in zip(ids, counts) if i > 0}
    comps: dict[int, tuple[int, ...]] = {}
    centroids: dict[int, tuple[float, ...]] = {}
    if not voxel_counts:
        return voxel_counts, comps, centroids
    boxes = ndimage.find_objects(lab.astype(np.int32, copy=False)) if small_ids else []
    for cls_id, n_voxels in voxel_counts.items():
        box = boxes[cls_id - 1] if cls_id - 1 < len(boxes) else None
        region = lab[box] == cls_id if box is not None else lab == cls_id
        cc, n = ndimage.label(region)
        sizes = np.bincount(cc.ravel(), minlength=n + 1)[1:]
        comps[cls_id] = tuple(int(s) for s in sorted(sizes.tolist(), reverse=True))
        centre = []
        for axis in range(region.ndim):
            profile = region.sum(axis=tuple(a for a in range(region.ndim) if a != axis), dtype=np.int64)
            start = box[axis].start if box is not None else 0
            centre.append(start + float(np.dot(profile, np.arange(profile.size))) / n_voxels)
        centroids[cls_id] = tuple(centre)
    return voxel_counts, comps, centroids


def _fingerprint_case(
    case: Case, index: int, samples_per_case: int, seed: int, ignore_label: int | None = None
) -> tuple[CaseFingerprint, list[np.ndarray]]:
    """Fingerprint one case; returns it and the sampled foreground intensities per channel (float32).

    Voxels holding ``ignore_label`` are treated as background (no class, no foreground intensity sample).
    """
    image, geometry = read_channels(list(case.image_files))
    shape = tuple(int(s) for s in image.shape[1:])
    bbox = nonzero_bbox(image)
    shape_after_crop = tuple(int(b.stop - b.start) for b in bbox)
    relative = float(np.prod(shape_after_crop, dtype=np.float64) / max(np.prod(shape, dtype=np.float64), 1.0))

    counts: dict[int, int] = {}
    comps: dict[int, tuple[int, ...]] = {}
    centroids: dict[int, tuple[float, ...]] = {}
    samples: list[np.ndarray] = [np.zeros(0, np.float32) for _ in range(image.shape[0])]
    if case.label_file is not None:
        label, _ = read_image(case.label_file)
        if tuple(label.shape) != shape:
            raise MedsegError(
                f"{case.label_file}: label shape {list(label.shape)} differs from image shape {list(shape)}"
            )
        if ignore_label is not None:
            label = np.where(label == ignore_label, 0, label)
        counts, comps, centroids = class_statistics(label)
        fg = np.flatnonzero(label.reshape(-1) > 0)
        if fg.size:
            rng = np.random.default_rng([seed, index])
            if fg.size > samples_per_case:
                fg = np.sort(rng.choice(fg, samples_per_case, replace=False))
            flat = image.reshape(image.shape[0], -1)
            samples = [flat[c, fg].astype(np.float32) for c in range(image.shape[0])]
    fp = CaseFingerprint(
        case_id=case.case_id,
        spacing=tuple(float(s) for s in geometry.spacing),
        shape=shape,
        shape_after_crop=shape_after_crop,
        relative_size_after_crop=relative,
        class_voxel_counts=counts,
        class_component_sizes=comps,
        class_centroids=centroids,
        image_percentiles=image_percentiles(image),
        direction=tuple(float(v) for v in geometry.direction),
    )
    return fp, samples


def _fingerprint_case_star(
    args: tuple[Case, int, int, int, int | None],
) -> tuple[CaseFingerprint, list[np.ndarray]]:
    return _fingerprint_case(*args)


def extract_fingerprint(
    ds: DatasetInfo,
    num_workers: int = 1,
    samples_per_case: int = DEFAULT_SAMPLES_PER_CASE,
    seed: int = DEFAULT_SEED,
    progress: bool = True,
) -> Fingerprint:
    """Compute the fingerprint of a (validated) dataset.

    Args:
        ds: the dataset (see :func:`medseg.io.dataset.load_dataset`).
        num_workers: processes reading cases in parallel (1 = in this process).
        samples_per_case: foreground voxels sampled per case for the intensity statistics.
        seed: sampling seed; the result does not depend on ``num_workers``.
        progress: show a tqdm progress bar.

    Returns:
        the :class:`Fingerprint`.

    Raises:
        MedsegError: the dataset has no cases, or a file cannot be read (the message names it).
    """
    cases = list(ds.cases)
    if not cases:
        raise MedsegError(f"{ds.root}: the dataset has no training cases")
    jobs = [(case, i, samples_per_case, seed, ds.ignore_label) for i, case in enumerate(cases)]
    results = map_cases(_fingerprint_case_star, jobs, num_workers, desc="fingerprint", progress=progress)

    num_channels = ds.num_channels
    intensity = tuple(
        IntensityStats.from_samples(np.concatenate([samples[c] for _, samples in results])) for c in range(num_channels)
    )
    fp = Fingerprint(
        dataset_name=ds.name,
        channel_names=tuple(ds.channel_names),
        label_ids=tuple(int(v) for v in ds.label_ids),
        cases=tuple(r[0] for r in results),
        intensity=intensity,
        samples_per_case=samples_per_case,
        seed=seed,
        ignore_label=ds.ignore_label,
    )
    logger.info(
        "fingerprint of %s: %d cases, median spacing %s, median shape after crop %s",
        ds.name,
        fp.num_cases,
        [round(s, 4) for s in fp.median_spacing()],
        list(fp.median_shape_after_crop()),
    )
    return fp
