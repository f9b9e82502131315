"""Measure the input guard: its false-alarm rate on held-out training cases and that it fires where it should.

For each dataset, every case is held out in turn (leave-one-out): the :class:`TrainingRange` of the other cases
is built from the fingerprint and the held-out image is checked; a warning there is a false alarm. Then the
issue's examples are checked against the full range: a CT (``totalseg_ct``) given to the MR model, and the
dataset's own cases with every spacing 4x (and 1/4x) larger, and the MR images of the other datasets (another
scanner and body part: expected to warn on size or intensity). Prints a Markdown table for docs/quality.md.

    PYTHONPATH=. python scripts/bench_input_guard.py [--data ../shared/data] [--datasets hippocampus chaos_t2]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections import Counter
from pathlib import Path

from medseg.fingerprint import extract_fingerprint
from medseg.inference.input_guard import TrainingRange, check_input
from medseg.io.dataset import load_dataset
from medseg.io.image import read_channels


def _kind(line: str) -> str:
    """The check a warning line comes from."""
    for word in ("looks like a CT", "does not look", "spacing", "image size", "intensities", "orientation"):
        if word in line:
            return {"looks like a CT": "modality", "does not look": "modality", "image size": "size"}.get(
                word, word if word != "intensities" else "intensity"
            )
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--datasets", nargs="+", default=["hippocampus", "chaos_t2"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = Path(args.data)
    ct_images = [read_channels(list(c.image_files)) for c in load_dataset(data / "totalseg_ct").cases]
    other_mr = {n: [read_channels(list(c.image_files)) for c in load_dataset(data / n).cases] for n in args.datasets}
    other_mr["totalseg_mr"] = [read_channels(list(c.image_files)) for c in load_dataset(data / "totalseg_mr").cases]
    rows = []
    for name in args.datasets:
        ds = load_dataset(data / name)
        fp = extract_fingerprint(ds, num_workers=2, progress=False)
        full = TrainingRange.from_fingerprint(fp)
        fired: Counter[str] = Counter()
        cases_fired = 0
        scaled_hits = 0
        images = []
        for i, case in enumerate(ds.cases):
            image, geometry = read_channels(list(case.image_files))
            images.append((image, geometry))
            held_out = dataclasses.replace(fp, cases=fp.cases[:i] + fp.cases[i + 1 :])
            lines = check_input(image, geometry, TrainingRange.from_fingerprint(held_out), case.case_id)
            cases_fired += bool(lines)
            fired.update({_kind(line) for line in lines})
            for factor in (4.0, 0.25):
                scaled = dataclasses.replace(geometry, spacing=tuple(s * factor for s in geometry.spacing))
                scaled_hits += any(_kind(x) == "spacing" for x in check_input(image, scaled, full, case.case_id))
        ct_hits = sum(any(_kind(x) == "modality" for x in check_input(im, geo, full, "ct")) for im, geo in ct_images)
        others = [im for other, ims in other_mr.items() if other != name for im in ims]
        other_kinds: Counter[str] = Counter()
        other_hits = 0
        for im, geo in others:
            lines = check_input(im, geo, full, "other")
            other_hits += bool(lines)
            other_kinds.update({_kind(line) for line in lines})
        n = len(ds.cases)
        rows.append(
            f"| {name} | {n} | {cases_fired}/{n} ({cases_fired / n:.1%}) | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(fired.items())) or '-'} | "
            f"{ct_hits}/{len(ct_images)} | {scaled_hits}/{2 * n} | {other_hits}/{len(others)} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(other_kinds.items()))}) |"
        )
    print(
        "| dataset | cases | held-out cases warned (false alarms) | by check | CT flagged (modality) | 4x / 0.25x spacing flagged "
        "| other MR datasets warned (by check) |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
