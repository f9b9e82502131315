"""medseg's hand-written sliding window, Dice+CE loss and spatial augmentation against MONAI's equivalents on the CPU.

Per component: the fastest of ``--repeats`` runs (after one warm-up) of each implementation on the same input,
and how far their results differ.

* **sliding window**: :func:`medseg.inference.sliding_window.predict_sliding_window` (step 0.5, Gaussian weights,
  no TTA) against ``monai.inferers.sliding_window_inference(overlap=0.5, mode="gaussian", sigma_scale=0.125)``
  followed by a softmax, a U-Net of the plan's hippocampus topology (16 features) on a ``(1, 80, 112, 80)`` volume
  (27 windows of 40 x 56 x 40); result: largest probability difference and argmax agreement.
* **Dice+CE loss**: :class:`medseg.training.losses.DiceCELoss` against ``monai.losses.DiceCELoss(to_onehot_y=True,
  softmax=True, include_background=False, smooth 1e-5)`` on logits ``(2, 3, 40, 56, 40)``, forward + backward;
  result: loss and gradient differences.
* **spatial augmentation**: one augmented patch 40 x 56 x 40 (rotation and scaling; then with elastic deformation)
  of a ``(1, 80, 112, 80)`` case with labels: :func:`medseg.training.augmentation.extract_patch` against
  ``monai.transforms.RandAffined`` (and ``Rand3DElasticd``) on the case cropped around the patch (MONAI transforms
  a whole array, so it gets the smallest crop that holds the rotated patch); result: voxels whose label agrees for
  the same rotation and zoom (no elastic: MONAI's and medseg's random fields differ by design).

    PYTHONPATH=. python scripts/bench_monai.py --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss as MonaiDiceCELoss
from monai.transforms import Affine, Rand3DElasticd, RandAffined

from medseg.inference.sliding_window import predict_sliding_window
from medseg.inference.tiling import gaussian_importance_map
from medseg.networks import NetworkSpec, build_network
from medseg.training.augmentation import SpatialParams, extract_patch, rotation_matrix
from medseg.training.losses import DiceCELoss

PATCH = (40, 56, 40)
VOLUME = (80, 112, 80)
HIPPOCAMPUS_STRIDES = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))


def fastest(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """(fastest seconds of ``repeats`` timed calls after one warm-up, the last result)."""
    out = fn()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_sliding_window(repeats: int) -> dict[str, object]:
    torch.manual_seed(0)
    spec = NetworkSpec("unet", ((3, 3, 3),) * 4, HIPPOCAMPUS_STRIDES, base_features=16, max_features=128)
    model = build_network(spec, 1, 3, patch_size=PATCH).eval()
    data = torch.randn(1, *VOLUME)

    def ours() -> torch.Tensor:
        with torch.no_grad():
            return predict_sliding_window(model, data, PATCH, 3, step=0.5)

    def monai() -> torch.Tensor:
        with torch.no_grad():
            logits = sliding_window_inference(
                data[None], PATCH, 1, model, overlap=0.5, mode="gaussian", sigma_scale=0.125
            )
            return torch.softmax(logits[0], 0)

    t_ours, p_ours = fastest(ours, repeats)
    t_monai, p_monai = fastest(monai, repeats)
    assert isinstance(p_ours, torch.Tensor) and isinstance(p_monai, torch.Tensor)
    agree = float((p_ours.argmax(0) == p_monai.argmax(0)).float().mean())
    # a network whose output does not depend on the window position: any weighting gives the same result, so
    # this compares the tiling and accumulation alone
    pointwise = torch.nn.Conv3d(1, 3, 1).eval()
    with torch.no_grad():
        a = predict_sliding_window(pointwise, data, PATCH, 3, step=0.5)
        b = torch.softmax(sliding_window_inference(data[None], PATCH, 1, pointwise, overlap=0.5, mode="gaussian")[0], 0)
    tiling = float((a.float() - b).abs().max())
    ours_map = gaussian_importance_map(PATCH)
    theirs_map = compute_importance_map(PATCH, mode="gaussian", sigma_scale=0.125)
    inner = ours_map > 1e-2  # where neither map is clamped to its floor
    ratio = (theirs_map / ours_map)[inner]
    return {
        "medseg_s": t_ours,
        "monai_s": t_monai,
        "result": (
            f"pointwise network: max |prob diff| {tiling:.1e} (same tiling); Gaussian maps proportional within "
            f"{float(ratio.max() / ratio.min() - 1):.1e} where > 0.01, floors {float(ours_map.min()):.0e} (medseg) vs "
            f"{float(theirs_map.min() / theirs_map.max()):.0e} (MONAI); random-weight U-Net: argmax agrees on "
            f"{agree:.2%} (differences where windows with floor weights disagree)"
        ),
    }


def bench_loss(repeats: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((2, 3, *PATCH), generator=gen)
    target = torch.randint(0, 3, (2, *PATCH), generator=gen)
    ours_fn = DiceCELoss()
    theirs_fn = MonaiDiceCELoss(
        include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5
    )

    def run(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], tuple[float, torch.Tensor]]:
        def step() -> tuple[float, torch.Tensor]:
            x = logits.clone().requires_grad_(True)
            loss = fn(x)
            loss.backward()
            assert x.grad is not None
            return float(loss.detach()), x.grad

        return step

    t_ours, (l_ours, g_ours) = fastest(run(lambda x: ours_fn(x, target)), repeats)  # type: ignore[misc]
    t_monai, (l_monai, g_monai) = fastest(run(lambda x: theirs_fn(x, target[:, None])), repeats)  # type: ignore[misc]
    gdiff = float((g_ours - g_monai).abs().max())
    return {
        "medseg_s": t_ours,
        "monai_s": t_monai,
        "result": f"loss {l_ours:.6f} vs {l_monai:.6f}, max |grad diff| {gdiff:.1e}",
    }


def _case() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, *VOLUME)).astype(np.float32)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in VOLUME], indexing="ij")
    centre = np.array(VOLUME) / 2
    r = np.sqrt(((zz - centre[0]) / 20) ** 2 + ((yy - centre[1]) / 30) ** 2 + ((xx - centre[2]) / 15) ** 2)
    labels = (r < 1).astype(np.int16) + (r < 0.5).astype(np.int16)
    return image, labels


def bench_augmentation(repeats: int) -> dict[str, object]:
    image, labels = _case()
    centre = np.array(VOLUME, dtype=np.float64) // 2  # a voxel centre: MONAI rotates about the crop's centre voxel
    angle, zoom = math.radians(20.0), 1.15
    matrix = rotation_matrix([angle, 0.0, 0.0]) / zoom
    params = SpatialParams(center=centre, matrix=matrix)
    elastic = SpatialParams(center=centre, matrix=matrix, elastic_seed=1, elastic_alpha=4.0, elastic_sigma=8.0)
    # the smallest box around the centre that holds the rotated, zoomed patch (what medseg cuts out itself)
    half = np.array([(p - 1) / 2 for p in PATCH])
    corners = np.array(np.meshgrid(*[[-h, h] for h in half], indexing="ij")).reshape(3, -1)
    reach = np.ceil(np.abs(matrix @ corners).max(1)).astype(int) + 5
    box = tuple(slice(int(c - r), int(c + r) + 1) for c, r in zip(centre.astype(int), reach))
    data = {"image": torch.from_numpy(image[(slice(None), *box)]), "label": torch.from_numpy(labels[box][None])}
    affine = RandAffined(
        keys=["image", "label"],
        prob=1.0,
        rotate_range=(math.radians(30), 0, 0),
        scale_range=(0.15, 0.15, 0.15),
        spatial_size=PATCH,
        mode=("bilinear", "nearest"),
        padding_mode="zeros",
    )
    elastic_t = Rand3DElasticd(
        keys=["image", "label"],
        sigma_range=(8, 8),
        magnitude_range=(4, 4),
        prob=1.0,
        rotate_range=(math.radians(30), 0, 0),
        scale_range=(0.15, 0.15, 0.15),
        spatial_size=PATCH,
        mode=("bilinear", "nearest"),
        padding_mode="zeros",
    )
    rows = {}
    t_ours, (_, lab_ours) = fastest(lambda: extract_patch(image, labels, params, PATCH), repeats)  # type: ignore[misc]
    t_monai, _ = fastest(lambda: affine(data), repeats)
    # the same rotation and zoom through MONAI's deterministic Affine: does it give the same labels?
    agree = 0.0
    for sign in (1.0, -1.0):  # MONAI's rotation angle convention relative to medseg's, whichever matches
        fixed = Affine(
            rotate_params=(sign * angle, 0.0, 0.0),
            scale_params=(1 / zoom,) * 3,
            spatial_size=PATCH,
            mode="nearest",
            padding_mode="zeros",
            image_only=True,
        )
        lab_monai = fixed(data["label"].float())[0].to(torch.int16)
        agree = max(agree, float((lab_monai == lab_ours).float().mean()))
    rows["rotation + zoom"] = {
        "medseg_s": t_ours,
        "monai_s": t_monai,
        "result": f"labels agree on {agree:.2%} of voxels (same rotation and zoom)",
    }
    t_ours_e, _ = fastest(lambda: extract_patch(image, labels, elastic, PATCH), repeats)
    t_monai_e, _ = fastest(lambda: elastic_t(data), repeats)
    rows["rotation + zoom + elastic"] = {
        "medseg_s": t_ours_e,
        "monai_s": t_monai_e,
        "result": "random fields differ by design; timing only",
    }
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (fastest reported)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {
        "sliding window (27 windows, no TTA)": bench_sliding_window(args.repeats),
        "Dice+CE loss, forward + backward": bench_loss(args.repeats),
    }
    rows.update({f"spatial augmentation, {k}": v for k, v in bench_augmentation(args.repeats).items()})
    print(f"| component | medseg (s) | MONAI (s) | MONAI / medseg | result |  (threads {args.threads})")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        ratio = float(r["monai_s"]) / float(r["medseg_s"])  # type: ignore[arg-type]
        print(f"| {name} | {r['medseg_s']:.4f} | {r['monai_s']:.4f} | {ratio:.2f}x | {r['result']} |")


if __name__ == "__main__":
    main()
