"""The preview images of ``medseg predict --preview``: ``OUT/previews/CASE.png``, one per case.

A 3D case is drawn as three orthogonal slices - axial, coronal, sagittal - through one voxel of the
**largest structure** (the largest connected component of any foreground label, full connectivity): the
voxel at the component's centroid or, where that lies outside it (a ring, a bent tube), its voxel nearest to
the centroid in mm, so the slices always cut it. Before slicing, image and labels are turned to the patient
axes (:func:`patient_axes`: array axes along superior, posterior, left by permuting and flipping views, no
resampling; an oblique direction goes to its nearest axes), so every case is shown alike: axial slices
with anterior up and the patient's right on the left (radiological convention), coronal and sagittal slices
with superior up. Each panel keeps the physical aspect ratio (pixel height / width = row spacing / column
spacing, so anisotropic voxels are not squashed). The image is grey, windowed between its 1st and 99th
percentiles; the labels are a coloured overlay (alpha 0.45; tab10 colours by the label's place among the
model's labels, the 60 of tab20/b/c beyond 10 labels) with a legend of the label ids and names the slices
show (the 12 with the most pixels in them). A case without any structure shows the central slices, titled
"no structure". A 2D case is one panel. The figure is always :func:`preview_size_px` pixels.

Drawing uses matplotlib's object interface (:class:`~matplotlib.figure.Figure`, the Agg canvas), no pyplot
and no global backend state; figures are drawn one at a time (writer threads share a lock).
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.inference.case_output import FinishedCase
from medseg.io.image import ImageGeometry, atomic_write_bytes, voxel_ml
from medseg.postprocessing.case_reports import read_case_image
from medseg.postprocessing.instances import index_to_world
from medseg.postprocessing.structure_statistics import label_boxes

__all__ = [
    "PREVIEW_DIR",
    "PatientView",
    "PreviewWriter",
    "largest_structure",
    "patient_axes",
    "preview_size_px",
    "render_preview",
]

logger = logging.getLogger(__name__)

#: The folder of the previews inside the prediction output folder.
PREVIEW_DIR = "previews"
_DPI = 100
_PANEL_INCHES = (4.0, 5.0)  # width per panel, height
_ALPHA = 0.45
_LEGEND_ENTRIES = 12  # two rows of six under the panels
_VIEWS = ("axial", "coronal", "sagittal")


def preview_size_px(ndim: int) -> tuple[int, int]:
    """The ``(width, height)`` in pixels of the preview of a ``ndim``-D case (3 panels in 3D, 1 in 2D)."""
    panels = 3 if ndim == 3 else 1
    return round(panels * _PANEL_INCHES[0] * _DPI), round(_PANEL_INCHES[1] * _DPI)


@dataclass(frozen=True)
class PatientView:
    """A case's arrays seen along the patient axes (see :func:`patient_axes`).

    Attributes:
        image: input intensities, a view ``(S, P, L)``-ordered (3D) or the 2D array as it is.
        labels: the label map, the same view.
        spacing: voxel size in mm in the view's axis order.
        geometry: the case's own geometry (for world positions).
        axes: per view axis, the array axis of the case it shows.
        flipped: per view axis, whether it runs against the case's array axis.
    """

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, ...]
    geometry: ImageGeometry
    axes: tuple[int, ...]
    flipped: tuple[bool, ...]

    def world(self, index: Sequence[int]) -> np.ndarray:
        """World position (mm, SimpleITK (x, y, z) order) of a voxel given by its index in the view."""
        original = [0] * len(index)
        for i, axis, flip in zip(index, self.axes, self.flipped):
            original[axis] = self.geometry.shape[axis] - 1 - int(i) if flip else int(i)
        point: np.ndarray = index_to_world(np.asarray([original], dtype=np.float64), self.geometry)[0]
        return point


def patient_axes(image: np.ndarray, labels: np.ndarray, geometry: ImageGeometry) -> PatientView:
    """Image and labels with their array axes turned to the patient axes, as views (no copy).

    Each array axis goes to the world axis its direction cosine points along most, sign included, so the
    view's axes increase towards superior, posterior and left (LPS, SimpleITK's physical space; what
    SimpleITK's ``DICOMOrient(image, "LPS")`` does by resampling-free permutation and flips). A 2D case, or a
    direction so oblique that two axes point along the same world axis most, is returned as it is.

    Args:
        image: ``(Z, Y, X)`` input intensities (first channel).
        labels: ``(Z, Y, X)`` label map on the same grid.
        geometry: their geometry.
    """
    ndim = geometry.ndim
    as_is = PatientView(image, labels, tuple(geometry.spacing), geometry, tuple(range(ndim)), (False,) * ndim)
    if ndim != 3:
        return as_is
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)[:, ::-1]  # columns: array axes
    world_axis = np.argmax(np.abs(direction), axis=0)  # per array axis (z, y, x order) its world axis (x, y, z)
    if sorted(world_axis.tolist()) != [0, 1, 2]:
        return as_is
    axes = tuple(int(np.flatnonzero(world_axis == w)[0]) for w in (2, 1, 0))  # view axis t shows world axis 2-t
    flipped = tuple(bool(direction[2 - t, a] < 0) for t, a in enumerate(axes))
    flips = tuple(t for t, f in enumerate(flipped) if f)

    def view(array: np.ndarray) -> np.ndarray:
        turned = np.transpose(array, axes)
        return np.flip(turned, flips) if flips else turned

    spacing = tuple(float(geometry.spacing[a]) for a in axes)
    return PatientView(view(image), view(labels), spacing, geometry, axes, flipped)


def largest_structure(
    labels: np.ndarray, spacing: Sequence[float], boxes: Mapping[int, tuple[slice, ...]] | None = None
) -> tuple[int, int, tuple[int, ...]] | None:
    """The largest connected component of any foreground label (full connectivity) and a voxel inside it.

    Args:
        labels: integer label map ``(Z, Y, X)`` or ``(Y, X)``.
        spacing: voxel size in mm, same order.
        boxes: :func:`~medseg.postprocessing.structure_statistics.label_boxes` of ``labels`` when known.

    Returns:
        ``(label, voxels, index)``: its label id, voxel count, and the array index of a voxel of it: the one
        at its centroid, or where that lies outside the component (a ring, a bent tube) its voxel nearest to
        the centroid in mm; None when ``labels`` has no foreground. Ties go to the lower label id.
    """
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    boxes = label_boxes(labels) if boxes is None else boxes
    best: tuple[int, int, tuple[int, ...]] | None = None
    for label, box in sorted(boxes.items()):
        if best is not None and int(np.prod([s.stop - s.start for s in box])) <= best[1]:
            continue  # its box holds fewer voxels than the best component
        components, n = ndimage.label(labels[box] == label, structure=structure)
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        sizes[0] = 0
        k = int(np.argmax(sizes))
        if best is None or int(sizes[k]) > best[1]:
            part = components == k
            centroid = np.asarray(ndimage.center_of_mass(part), dtype=np.float64)
            inside = tuple(int(round(c)) for c in centroid)
            if not part[inside]:
                points = np.argwhere(part)
                scale = np.asarray(spacing, dtype=np.float64)
                inside = tuple(int(v) for v in points[int(np.argmin((((points - centroid) * scale) ** 2).sum(1)))])
            best = (label, int(sizes[k]), tuple(i + s.start for i, s in zip(inside, box)))
    return best


def _colours(label_ids: Sequence[int]) -> dict[int, tuple[float, float, float]]:
    """An RGB colour per foreground label id by its place in ``label_ids``: tab10 for up to 10 labels, else
    tab20, tab20b and tab20c (60 colours, repeating beyond)."""
    ids = sorted({int(i) for i in label_ids if int(i) != 0})
    maps = ["tab10"] if len(ids) <= 10 else ["tab20", "tab20b", "tab20c"]
    palette = [colormaps[m](k) for m in maps for k in range(colormaps[m].N)]
    colours = {}
    for k, label in enumerate(ids):
        red, green, blue, _ = palette[k % len(palette)]
        colours[label] = (float(red), float(green), float(blue))
    return colours


def _legend(
    shown: Sequence[np.ndarray], colours: Mapping[int, tuple[float, float, float]], names: Mapping[int, str]
) -> list[Patch]:
    """Legend entries of the labels the panels show, most pixels first, at most :data:`_LEGEND_ENTRIES`
    (the last one then says how many more there are)."""
    counts: dict[int, int] = {}
    for overlay in shown:
        ids, n = np.unique(overlay[overlay != 0], return_counts=True)
        for label, count in zip(ids.tolist(), n.tolist()):
            counts[label] = counts.get(label, 0) + count
    ranked = sorted(counts, key=lambda label: (-counts[label], label))
    if len(ranked) > _LEGEND_ENTRIES:
        keep = ranked[: _LEGEND_ENTRIES - 1]
        more = [Patch(color="none", label=f"+{len(ranked) - len(keep)} more")]
    else:
        keep, more = ranked, []
    return [Patch(color=colours[i], label=f"{i} {names.get(i, f'label {i}')}") for i in keep] + more


def render_preview(
    image: np.ndarray,
    labels: np.ndarray,
    geometry: ImageGeometry,
    title: str,
    names: Mapping[int, str] | None = None,
) -> bytes:
    """The PNG of a case's preview (see the module docstring).

    Args:
        image: ``(Z, Y, X)`` (or ``(Y, X)``) input intensities, first channel.
        labels: integer label map on the same grid (original label ids, 0 = background).
        geometry: their geometry.
        title: the case's name, at the top.
        names: the model's label id -> name (ids without a name are called ``label <id>``).

    Returns:
        PNG bytes, :func:`preview_size_px` pixels.

    Raises:
        MedsegError: image and labels differ in shape from each other or from ``geometry``.
    """
    if not tuple(image.shape) == tuple(labels.shape) == tuple(geometry.shape):
        raise MedsegError(
            f"image {list(image.shape)}, labels {list(labels.shape)} and geometry {list(geometry.shape)} differ in shape"
        )
    names = dict(names or {})
    view = patient_axes(image, labels, geometry)
    grey, seg, spacing = view.image, view.labels, view.spacing
    boxes = label_boxes(seg)
    largest = largest_structure(seg, spacing, boxes)
    present = sorted(boxes)
    colours = _colours([*names, *present])
    lut = np.zeros((max([0, *colours]) + 1, 4))
    for label, colour in colours.items():
        lut[label] = (*colour, _ALPHA)
    sample = image.reshape(-1)[:: max(1, image.size // 1_000_000)].astype(np.float64)  # orientation-free
    low, high = (float(v) for v in np.percentile(sample, [1.0, 99.0]))
    high = high if high > low else low + 1.0
    if largest is None:
        centre = tuple(n // 2 for n in seg.shape)
        heading = f"{title}: no structure"
    else:
        label, voxels, centre = largest
        volume = voxels * voxel_ml(spacing)
        heading = f"{title}: largest structure {label} {names.get(label, f'label {label}')} ({volume:.1f} mL)"
    world = view.world(centre)
    if seg.ndim == 3:
        z, y, x = centre
        sz, sy, sx = spacing
        panels = [
            (f"axial, z = {world[2]:.1f} mm", grey[z], seg[z], sy / sx, "upper"),
            (f"coronal, y = {world[1]:.1f} mm", grey[:, y, :], seg[:, y, :], sz / sx, "lower"),
            (f"sagittal, x = {world[0]:.1f} mm", grey[:, :, x], seg[:, :, x], sz / sy, "lower"),
        ]
    else:
        panels = [("slice", grey, seg, spacing[0] / spacing[1], "upper")]
    width, height = preview_size_px(seg.ndim)
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, pixels, overlay, aspect, origin) in zip(axes, panels):
        ax.imshow(pixels, cmap="gray", vmin=low, vmax=high, aspect=aspect, origin=origin, interpolation="nearest")
        ax.imshow(lut[overlay], aspect=aspect, origin=origin, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    handles = _legend([p[2] for p in panels], colours, names)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(heading, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.87, bottom=0.15, wspace=0.05)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


class PreviewWriter:
    """Writes each predicted case's preview, ``OUT/previews/CASE.png``.

    Args:
        output_dir: the prediction output folder.
        names: label id -> name (from the plan / dataset.json).

    Attributes:
        folder: ``OUT/previews``.
        written: case ids whose preview this run wrote.
    """

    def __init__(self, output_dir: Path, names: Mapping[int, str] | None = None) -> None:
        self.folder = Path(output_dir) / PREVIEW_DIR
        self.names = dict(names or {})
        self.written: list[str] = []
        self._lock = threading.Lock()

    def png_path(self, case_id: str) -> Path:
        """``OUT/previews/CASE.png``."""
        return self.folder / f"{case_id}.png"

    def missing(self, case_ids: Iterable[str]) -> list[str]:
        """The cases of ``case_ids`` that have no preview file yet."""
        return [c for c in case_ids if not self.png_path(c).is_file()]

    def revisit(self, case: FinishedCase) -> None:
        """Draw the preview of a case whose segmentation existed (as :meth:`__call__`)."""
        self(case)

    def __call__(self, case: FinishedCase) -> None:
        """Draw and write the preview of ``case`` (called on a writer thread).

        Raises:
            MedsegError: the input image is unreadable or of another shape, or the PNG cannot be written.
        """
        image = read_case_image(case)
        target = self.png_path(case.case_id)
        with self._lock:
            png = render_preview(image, case.labels, case.geometry, case.case_id, self.names)
        try:
            atomic_write_bytes(target, png)
        except OSError as exc:
            raise MedsegError(f"{target}: cannot write the preview ({exc.strerror or exc})") from None
        with self._lock:
            self.written.append(case.case_id)
        logger.info("%s: preview -> %s", case.case_id, target)
