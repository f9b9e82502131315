"""Whether a time-budgeted run uses the intensity transforms: decided from the training cases' contrast.

nnU-Net trains with noise, blur, brightness, contrast, low-resolution and gamma transforms. In a budget of
a thousand or two iterations they cost fit where the test images look like the training images: on the
hippocampus crops (one scanner, label intensities alike in every case) leaving them out scored +0.004 and
+0.000 mean Dice (two seeds, 30 minutes). They are what lets a model cover a contrast it was not shown,
and abdominal MRI has such cases: in the CHAOS T2 set the kidneys of one case of 20 (036) lie 1.0-1.3 image
standard deviations above the image mean, against 2.2-3.8 in the other 19. So the transforms stay on
(nnU-Net's behaviour) unless the training cases show that there is little contrast to cover.

The evidence is the *across-case spread* of every foreground class's mean normalised intensity, in units of
its within-case spread (root mean square of the per-case standard deviations)::

    spread(k, c) = std over cases of mean_k,c  /  sqrt(mean over cases of std_k,c ** 2)

A value of 0.2 says a structure's average brightness moves by a fifth of its own texture from case to case;
1.0 says whole structures change brightness by as much as they vary inside. The run's spread is the median
over classes and channels. Measured on the preprocessed training cases: hippocampus (200) 0.22 / 0.22
(median 0.22); CHAOS T2 (the 15 training cases of the benchmark split) liver 0.87, kidneys 0.45 / 0.45,
spleen 1.16 (median 0.66). The transforms are left out when the spread is below :data:`HOMOGENEOUS_SPREAD`
(0.4, about the geometric mean of the two), measured on at least :data:`MIN_CASES` cases; with fewer
cases, or caches written before the statistics existed, they stay on.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from typing import Any

from medseg.preprocessing.case import CaseProperties

logger = logging.getLogger(__name__)

#: below this median across-case spread a time-budgeted run trains without the intensity transforms
HOMOGENEOUS_SPREAD = 0.4
#: fewer training cases holding a class say too little of its spread; the class is left out
MIN_CASES = 10


def class_spreads(props: Sequence[CaseProperties]) -> dict[str, float]:
    """Across-case spread of each (class, channel) held by at least :data:`MIN_CASES` of ``props``.

    Returns:
        ``"<class index>/<channel>"`` -> spread (see the module docstring), rounded to 4 decimals.
    """
    samples: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for p in props:
        for k, channels in p.class_intensity.items():
            for c, (mean, std) in enumerate(channels):
                samples.setdefault((int(k), c), []).append((float(mean), float(std)))
    out: dict[str, float] = {}
    for (k, c), pairs in sorted(samples.items()):
        if len(pairs) < MIN_CASES:
            continue
        within = math.sqrt(statistics.fmean(s * s for _, s in pairs))
        if within <= 0.0:
            continue
        out[f"{k}/{c}"] = round(statistics.stdev(m for m, _ in pairs) / within, 4)
    return out


def decide_intensity_augmentation(props: Sequence[CaseProperties]) -> dict[str, Any]:
    """The intensity-augmentation choice of a time-budgeted run from its training cases' properties.

    Returns:
        A JSON-ready record: ``intensity`` (the choice), ``spread`` (the median, None without evidence),
        ``spreads`` (per ``"class/channel"``), ``cases``, ``threshold`` and ``reason``.
    """
    spreads = class_spreads(props)
    record: dict[str, Any] = {
        "cases": len(props),
        "threshold": HOMOGENEOUS_SPREAD,
        "spreads": spreads,
        "spread": None,
    }
    if not spreads:
        record.update(
            intensity=True,
            reason=f"no class is held by {MIN_CASES} training cases with intensity statistics: on (nnU-Net's choice)",
        )
        return record
    spread = round(statistics.median(spreads.values()), 4)
    record["spread"] = spread
    if spread < HOMOGENEOUS_SPREAD:
        record.update(
            intensity=False,
            reason=f"label intensities alike across cases (spread {spread:.2f} < {HOMOGENEOUS_SPREAD}): off",
        )
    else:
        record.update(
            intensity=True,
            reason=f"label intensities vary across cases (spread {spread:.2f} >= {HOMOGENEOUS_SPREAD}): on",
        )
    return record
