"""The candidate grid of the time-budget fit: widths, patches (halved for large images) and batches."""

from __future__ import annotations

from medseg.planning.candidates import default_candidates, smaller_patches
from tests.helpers import network_plan

from .conftest import PATCH, hippocampus_like_plan


def test_grid_for_an_image_the_patch_covers():
    net = hippocampus_like_plan().configuration("3d_fullres").network()
    cands = default_candidates(net, (36, 50, 35))
    assert [(c.base_features, c.max_features, c.patch_size, c.batch_size) for c in cands] == [
        (16, 160, PATCH, 2),
        (16, 160, PATCH, 4),
        (24, 240, PATCH, 2),
        (24, 240, PATCH, 4),
        (32, 320, PATCH, 2),
        (32, 320, PATCH, 4),
    ]


def test_large_images_get_halved_patches_divisible_by_the_stride():
    net = network_plan(
        arch="unet",
        patch_size=(80, 192, 160),
        batch_size=2,
        kernel_sizes=((3, 3, 3),) * 5,
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)),
    )
    patches = smaller_patches(net, (300, 400, 400))
    assert patches == [(80, 192, 160), (80, 96, 160), (80, 96, 80)]
    # no halving when the patch covers the median image
    assert smaller_patches(net, (80, 150, 150)) == [(80, 192, 160)]
