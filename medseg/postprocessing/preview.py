"""The preview images of ``medseg predict --preview``: ``OUT/previews/CASE.png``, one per case.

A 3D case is drawn as three orthogonal slices - axial, coronal, sagittal - through one voxel of the
**largest structure** (the largest connected component of any foreground label, full connectivity): the
voxel of that component nearest (in mm) to the component's centroid, so the slices cut it even when it is
not convex. Before slicing, image and labels are turned to the patient axes (SimpleITK's
``DICOMOrient(..., "LPS")``: array axes along left, posterior, superior; an oblique direction goes to its
nearest axes), so every case is shown alike: axial slices with anterior up and the patient's right on the
left (radiological convention), coronal and sagittal slices with superior up. Each panel keeps the
physical aspect ratio (pixel height / width = row spacing / column spacing, so anisotropic voxels are not
squashed). The image is grey, windowed between its 1st and 99th percentiles; the labels are a coloured
overlay (tab10/tab20 colours by the label's place among the model's labels, alpha 0.45) with a legend of the
label ids and names present. A case without any structure shows the central slices, titled "no structure".
A 2D case is one panel. The figure is always :func:`preview_size_px` pixels.

Drawing uses matplotlib's object interface (:class:`~matplotlib.figure.Figure`, the Agg canvas), no pyplot
and no global backend state; figures are drawn one at a time (writer threads share a lock).
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.inference.case_output import FinishedCase
from medseg.io.image import ImageGeometry, atomic_write_bytes, read_image
from medseg.postprocessing.structure_statistics import label_boxes

__all__ = [
    "PREVIEW_DIR",
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
_PANEL_INCHES = (4.0, 4.5)  # width per panel, height
_ALPHA = 0.45
_VIEWS = ("axial", "coronal", "sagittal")


def preview_size_px(ndim: int) -> tuple[int, int]:
    """The ``(width, height)`` in pixels of the preview of a ``ndim``-D case (3 panels in 3D, 1 in 2D)."""
    panels = 3 if ndim == 3 else 1
    return round(panels * _PANEL_INCHES[0] * _DPI), round(_PANEL_INCHES[1] * _DPI)


def patient_axes(
    image: np.ndarray, labels: np.ndarray, geometry: ImageGeometry
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], sitk.Image]:
    """Image and labels with their array axes turned to the patient axes (3D; a 2D case is returned as is).

    Args:
        image: ``(Z, Y, X)`` input intensities (first channel).
        labels: ``(Z, Y, X)`` label map on the same grid.
        geometry: their geometry.

    Returns:
        ``(image, labels, spacing, oriented)``: arrays ``(S, P, L)``-ordered (index increasing towards
        superior, posterior, left), their spacing in mm in the same order, and the oriented label image (for
        index -> world positions).
    """
    label_image = sitk.GetImageFromArray(labels)
    geometry.apply_to(label_image)
    if geometry.ndim != 3:
        return image, labels, tuple(geometry.spacing), label_image
    grey = sitk.GetImageFromArray(image)
    geometry.apply_to(grey)
    grey, label_image = (sitk.DICOMOrient(i, "LPS") for i in (grey, label_image))
    spacing = tuple(float(s) for s in reversed(label_image.GetSpacing()))
    return sitk.GetArrayFromImage(grey), sitk.GetArrayFromImage(label_image), spacing, label_image


def largest_structure(labels: np.ndarray, spacing: Sequence[float]) -> tuple[int, int, tuple[int, ...]] | None:
    """The largest connected component of any foreground label (full connectivity) and a voxel inside it.

    Args:
        labels: integer label map ``(Z, Y, X)`` or ``(Y, X)``.
        spacing: voxel size in mm, same order.

    Returns:
        ``(label, voxels, index)``: its label id, voxel count, and the array index of its voxel nearest (in mm)
        to its centroid; None when ``labels`` has no foreground. Ties go to the lower label id.
    """
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    best: tuple[int, int, tuple[int, ...]] | None = None
    for label, box in sorted(label_boxes(labels).items()):
        if best is not None and int(np.prod([s.stop - s.start for s in box])) <= best[1]:
            continue  # its box holds fewer voxels than the best component
        components, n = ndimage.label(labels[box] == label, structure=structure)
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        sizes[0] = 0
        k = int(np.argmax(sizes))
        if best is None or int(sizes[k]) > best[1]:
            points = np.argwhere(components == k)
            scale = np.asarray(spacing, dtype=np.float64)
            centroid = points.mean(axis=0)
            nearest = points[int(np.argmin((((points - centroid) * scale) ** 2).sum(axis=1)))]
            index = tuple(int(p + s.start) for p, s in zip(nearest, box))
            best = (label, int(sizes[k]), index)
    return best


def _colours(label_ids: Sequence[int]) -> dict[int, tuple[float, float, float, float]]:
    """A colour per foreground label id by its place in ``label_ids`` (tab10, tab20 beyond 10 labels)."""
    ids = sorted({int(i) for i in label_ids if int(i) != 0})
    cmap = colormaps["tab10" if len(ids) <= 10 else "tab20"]
    return {label: tuple(float(c) for c in cmap(k % cmap.N)) for k, label in enumerate(ids)}  # type: ignore[misc]


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
    """
    names = dict(names or {})
    grey, seg, spacing, oriented = patient_axes(image, labels, geometry)
    largest = largest_structure(seg, spacing)
    present = sorted(label_boxes(seg))
    colours = _colours([*names, *present])
    lut = np.zeros((max([0, *colours]) + 1, 4))
    for label, colour in colours.items():
        lut[label] = (*colour[:3], _ALPHA)
    sample = grey.ravel()[:: max(1, grey.size // 1_000_000)].astype(np.float64)
    low, high = (float(v) for v in np.percentile(sample, [1.0, 99.0]))
    high = high if high > low else low + 1.0
    if largest is None:
        centre = tuple(n // 2 for n in seg.shape)
        heading = f"{title}: no structure"
    else:
        label, voxels, centre = largest
        volume = voxels * float(np.prod(spacing)) / 1000.0
        heading = f"{title}: largest structure {label} {names.get(label, f'label {label}')} ({volume:.1f} mL)"
    world = oriented.TransformIndexToPhysicalPoint([int(i) for i in reversed(centre)])
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
    handles = [Patch(color=colours[i][:3], label=f"{i} {names.get(i, f'label {i}')}") for i in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(heading, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.1, wspace=0.05)
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
        image, _ = read_image(case.reference)
        if tuple(image.shape) != tuple(case.labels.shape):
            raise MedsegError(
                f"{case.reference}: image shape {list(image.shape)} differs from the segmentation's "
                f"{list(case.labels.shape)}"
            )
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
