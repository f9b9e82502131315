"""Leave-one-out false alarms of the quality verdict's volume rules on a dataset's reference volumes.

Each training reference is held out in turn and judged against the others, as ``quality.json`` judges a
prediction: the joint rule (:mod:`medseg.postprocessing.volume_distance`, squared Mahalanobis distance of the
log-volumes over the labels present in >= 95% of the cases vs the chi-square 0.999 quantile) and, beside it, the
per-label ``|z| > 3`` rule. A reference flagged is a false alarm. Prints a Markdown table for docs/benchmarks.md.

    PYTHONPATH=. python scripts/bench_volume_distance.py [--data ../shared/data] [--datasets hippocampus chaos_t2]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from medseg.io.dataset import load_dataset
from medseg.io.image import read_image
from medseg.postprocessing.quality_features import EXPECTED_PRESENT, VOLUME_Z
from medseg.postprocessing.volume_distance import fit_joint_volumes, volume_distance


def reference_volumes(root: Path) -> tuple[list[str], list[dict[str, float]]]:
    """Case ids and, per case, label id (str) -> reference volume in ml (0: absent)."""
    ds = load_dataset(root)
    labels = [int(k) for k in ds.label_ids[1:]]
    ids, table = [], []
    for case in ds.cases:
        ref, geometry = read_image(case.label_file)
        counts = np.bincount(ref.astype(np.int64).ravel(), minlength=max(labels) + 1)
        ml = float(np.prod(geometry.spacing)) / 1000.0
        ids.append(case.case_id)
        table.append({str(k): float(counts[k]) * ml for k in labels})
    return ids, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--datasets", nargs="+", default=["hippocampus", "chaos_t2"])
    args = parser.parse_args()
    print("| dataset | cases | labels | largest D^2 (case) | threshold | joint rule flags | max abs z > 3 flags |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for name in args.datasets:
        ids, table = reference_volumes(Path(args.data) / name)
        labels = [k for k in table[0] if np.mean([c[k] > 0 for c in table]) >= EXPECTED_PRESENT]
        worst, threshold, joint_flags, z_flags = (-1.0, ""), math.nan, 0, 0
        for i, case in enumerate(table):
            others = table[:i] + table[i + 1 :]
            joint = fit_joint_volumes(others, labels)
            record = None
            if joint is not None:
                record = volume_distance({k: {"voxels": int(v > 0), "volume_ml": v} for k, v in case.items()}, joint)
            if record is not None:
                worst = max(worst, (record["mahalanobis2"], ids[i]))
                threshold = record["threshold"]
                joint_flags += record["mahalanobis2"] > record["threshold"]
            zs = []
            for k, v in case.items():
                logs = [math.log(o[k]) for o in others if o[k] > 0]
                if v > 0 and len(logs) > 1 and np.std(logs) > 0:
                    zs.append(abs(math.log(v) - np.mean(logs)) / np.std(logs))
            z_flags += bool(zs) and max(zs) > VOLUME_Z
        print(
            f"| {name} | {len(table)} | {len(labels)} | {worst[0]:.1f} ({worst[1]}) | {threshold:.1f} "
            f"| {joint_flags}/{len(table)} | {z_flags}/{len(table)} |"
        )


if __name__ == "__main__":
    main()
