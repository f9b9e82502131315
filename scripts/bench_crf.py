"""Time the dense CRF (``medseg predict --postprocess crf``) per case on real hippocampus and CHAOS T2 volumes.

    PYTHONPATH=. python scripts/bench_crf.py [--data ../shared/data] [--cases 3] [--threads N]

For the first ``--cases`` cases of ``hippocampus`` and ``chaos_t2``, stands in for a network's softmax with
the softmax of 6 x the reference label map blurred (Gaussian, 1.5 voxels) plus Gaussian noise (sd 1.5; so
the argmax has scattered errors for the CRF to change), runs :func:`~medseg.postprocessing.crf.dense_crf` with the default :class:`CrfParams` (5 mean-field
iterations) and prints the shape, the seconds, and the foreground Dice of the argmax before and after against
the reference (a sanity check only: the input is not a network's prediction, so the numbers say nothing about
the CRF's accuracy on real predictions).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from medseg.evaluation.metrics import dice_from_counts, overlap_counts
from medseg.io.image import read_image, strip_suffix
from medseg.postprocessing.crf import CrfParams, dense_crf


def _stand_in(ref: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    onehot = np.stack([ndimage.gaussian_filter((ref == c).astype(np.float32), 1.5) for c in range(k)])
    logits = 6.0 * onehot + rng.normal(0, 1.5, onehot.shape).astype(np.float32)
    e = np.exp(logits - logits.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"torch threads: {torch.get_num_threads()}")
    for name in ("hippocampus", "chaos_t2"):
        root = Path(args.data) / name
        for path in sorted((root / "labelsTr").glob("*.nii.gz"))[: args.cases]:
            case = strip_suffix(path.name)
            image_path = next(p for p in (root / "imagesTr").glob(f"{case}*.nii.gz"))
            ref, geometry = read_image(path)
            image, _ = read_image(image_path)
            ref = ref.astype(np.int64)
            k = int(ref.max()) + 1
            probs = _stand_in(ref, k, rng)
            start = time.perf_counter()
            q = dense_crf(probs, image.astype(np.float32), geometry.spacing, CrfParams())
            seconds = time.perf_counter() - start
            before = dice_from_counts(overlap_counts(probs.argmax(0), ref, k))[1:].mean()
            after = dice_from_counts(overlap_counts(q.argmax(0), ref, k))[1:].mean()
            print(
                f"{name} {case}: shape {list(ref.shape)} spacing {[round(s, 2) for s in geometry.spacing]} K={k}: "
                f"{seconds:.2f} s; stand-in Dice {before:.3f} -> {after:.3f}"
            )


if __name__ == "__main__":
    main()
