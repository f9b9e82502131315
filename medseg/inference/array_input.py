"""Segmenting images held in memory: numpy arrays and SimpleITK images (a mixin of the predictor).

:class:`InMemoryInput` gives :class:`~medseg.inference.predictor.Predictor` its entry points for images that
are not files: an array with a spacing or geometry (:meth:`InMemoryInput.predict_array`) and SimpleITK images
(:meth:`InMemoryInput.predict_sitk`); both go through the predictor's ``predict_labels``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.io.image import ImageGeometry
from medseg.planning.plan import Plan


class InMemoryInput:
    """In-memory entry points of a predictor (a mixin): uses its ``plan`` and ``predict_labels``."""

    plan: Plan

    def predict_labels(
        self, image: np.ndarray, geometry: ImageGeometry, case_id: str = "", postprocess: bool = True
    ) -> np.ndarray:
        """Segment a raw image ``(C, Z, Y, X)`` (the predictor's own method)."""
        raise NotImplementedError

    def predict_array(self, image: np.ndarray, spacing_or_geometry: ImageGeometry | Sequence[float]) -> np.ndarray:
        """Segment an in-memory image.

        Args:
            image: raw intensities, ``(C, Z, Y, X)``, or ``(Z, Y, X)`` for a single channel.
            spacing_or_geometry: voxel spacing in mm ``(Z, Y, X)`` or a full :class:`ImageGeometry`.

        Returns:
            Original label ids ``(Z, Y, X)`` (uint8 / uint16), postprocessed.
        """
        image = np.asarray(image, dtype=np.float32)
        if image.ndim == 3 and self.plan.num_channels == 1:
            image = image[None]
        if image.ndim != 4 or image.shape[0] != self.plan.num_channels:
            raise MedsegError(
                f"expected an image with {self.plan.num_channels} channel(s), (C, Z, Y, X), "
                f"got shape {list(image.shape)}"
            )
        if isinstance(spacing_or_geometry, ImageGeometry):
            geometry = spacing_or_geometry
        else:
            spacing = tuple(float(s) for s in spacing_or_geometry)
            if len(spacing) != 3:
                raise MedsegError(f"spacing must have 3 entries (Z, Y, X) in mm, got {list(spacing)}")
            geometry = ImageGeometry(
                tuple(image.shape[1:]), spacing, (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
            )
        return self.predict_labels(image, geometry)

    def predict_sitk(self, image: sitk.Image | Sequence[sitk.Image]) -> sitk.Image:
        """Segment SimpleITK image(s) (one per channel); the result has the input's exact geometry."""
        images = [image] if isinstance(image, sitk.Image) else list(image)
        if len(images) != self.plan.num_channels:
            raise MedsegError(f"the model expects {self.plan.num_channels} channel image(s), got {len(images)}")
        arrays = [sitk.GetArrayFromImage(im).astype(np.float32) for im in images]
        if any(a.shape != arrays[0].shape for a in arrays):
            raise MedsegError(f"channel images differ in shape: {[list(a.shape) for a in arrays]}")
        geometry = ImageGeometry.from_sitk(images[0])
        seg = self.predict_labels(np.stack(arrays), geometry)
        out = sitk.GetImageFromArray(seg)
        out.CopyInformation(images[0])
        return out
