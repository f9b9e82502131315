"""Predictor with a cascade: the previous stage segments first, its one-hot segmentation reaches the cascade
network on the cascade's grid after the image channels, and the result keeps the input geometry."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from medseg.errors import MedsegError
from medseg.inference import EnsembleMember, Predictor

from .conftest import Threshold, bright_box_image, build_plan

CASCADE = "3d_cascade_fullres"


class FromPreviousStage(torch.nn.Module):
    """Class 1 where the previous stage's one-hot channel (channel 1, after the image) says so."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 2, x.shape
        return torch.cat([torch.zeros_like(x[:, :1]), 10.0 * (x[:, 1:2] - 0.5)], 1)


def _plan():
    plan = build_plan(spacings={"3d_fullres": (3.0, 0.8, 1.2), "3d_lowres": (6.0, 1.6, 2.4)})
    full = plan.configuration("3d_fullres")
    cascade = dataclasses.replace(full, name=CASCADE, previous_stage="3d_lowres")
    return dataclasses.replace(plan, configurations={**plan.configurations, CASCADE: cascade}).validate()


def test_cascade_predicts_from_the_previous_stage_segmentation():
    plan = _plan()
    assert plan.network_in_channels(CASCADE) == 2
    image, box = bright_box_image()
    lowres = Predictor([EnsembleMember(Threshold(), plan, "3d_lowres", "unet")], use_tta=False, precision="fp32")
    cascade = Predictor(
        [EnsembleMember(FromPreviousStage(), plan, CASCADE, "unet")],
        use_tta=False,
        precision="fp32",
        previous_stages={"3d_lowres": lowres},
    )
    seg = cascade.predict_array(image, (3.0, 0.8, 1.2))
    low = lowres.predict_array(image, (3.0, 0.8, 1.2))
    assert seg.shape == image.shape and set(np.unique(seg)) <= {0, 1}
    assert np.mean(seg == low) > 0.99 and np.mean((seg == 1) == box) > 0.9


def test_cascade_without_its_previous_stage_is_refused():
    plan = _plan()
    image, _ = bright_box_image()
    cascade = Predictor([EnsembleMember(FromPreviousStage(), plan, CASCADE, "unet")], use_tta=False)
    with pytest.raises(MedsegError, match="no 3d_lowres predictor"):
        cascade.predict_array(image, (3.0, 0.8, 1.2))
    with pytest.raises(MedsegError, match="C=2"):
        cascade.predict_preprocessed(np.zeros((1, 8, 16, 16), np.float32), CASCADE)
