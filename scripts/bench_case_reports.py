"""Time the per-case reports of ``medseg predict --statistics`` and ``--preview`` on real and large label maps.

    PYTHONPATH=. python scripts/bench_case_reports.py [--data ../shared/data/totalseg_ct] [--png-dir DIR]

For each case of an MSD dataset (its reference label map standing in for a prediction) and for one synthetic
CT-sized volume (300 x 512 x 512 int16, four box-shaped labels, the largest 15 M voxels), prints the shape,
the labels declared / present, the seconds of :func:`~medseg.postprocessing.structure_statistics` (image in
memory) and of :func:`~medseg.postprocessing.render_preview`, and the largest structure's numbers. With
``--png-dir`` the previews are written there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from medseg.io.image import ImageGeometry, read_image, strip_suffix
from medseg.postprocessing import render_preview, structure_statistics


def _cases(data: Path) -> list[tuple[str, np.ndarray, np.ndarray, ImageGeometry, dict[int, str]]]:
    labels = json.loads((data / "dataset.json").read_text())["labels"]
    names = {int(v): k for k, v in labels.items()}
    found = []
    for path in sorted((data / "labelsTr").glob("*.nii.gz")):
        case = strip_suffix(path.name)
        seg, geometry = read_image(path)
        image, _ = read_image(data / "imagesTr" / path.name)
        found.append((case, image, seg, geometry, names))
    shape = (300, 512, 512)
    geometry = ImageGeometry(shape, (1.5, 0.8, 0.8), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    image = np.random.default_rng(0).integers(-1000, 1000, shape, dtype=np.int16)
    seg = np.zeros(shape, np.uint8)
    seg[50:250, 100:400, 100:350] = 1
    seg[100:150, 200:260, 380:450] = 2
    seg[10:20, 10:20, 10:20] = 3
    seg[260:290, 50:450, 50:450] = 4
    found.append(("synthetic_300x512x512", image, seg, geometry, {i: f"box {i}" for i in range(5)}))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/totalseg_ct"))
    parser.add_argument("--png-dir", type=Path, default=None)
    args = parser.parse_args()
    print("| case | shape | labels (present) | statistics s | preview s | largest: name, mL, components, HU mean |")
    print("|---|---|---|---|---|---|")
    for case, image, seg, geometry, names in _cases(args.data):
        start = time.perf_counter()
        rows = structure_statistics(seg, geometry, sorted(names), names, image)
        stats_s = time.perf_counter() - start
        start = time.perf_counter()
        png = render_preview(image, seg, geometry, case, names)
        preview_s = time.perf_counter() - start
        if args.png_dir is not None:
            args.png_dir.mkdir(parents=True, exist_ok=True)
            (args.png_dir / f"{case}.png").write_bytes(png)
        present = [r for r in rows if r.voxels]
        big = max(present, key=lambda r: r.voxels)
        print(
            f"| {case} | {'x'.join(map(str, seg.shape))} | {len(rows)} ({len(present)}) | {stats_s:.2f} | "
            f"{preview_s:.2f} | {big.name}, {big.volume_ml:.1f}, {big.components}, {big.intensity_mean:.1f} |"
        )


if __name__ == "__main__":
    main()
