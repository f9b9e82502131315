"""``medseg predict --postprocess crf``: the dense CRF (:mod:`medseg.postprocessing.crf`) as a case hook.

The CRF needs a case's probabilities and its image, which the predictor's label-map postprocessing never sees,
so it runs as the *first* :data:`~medseg.inference.case_output.CaseHook`: it recomputes the label map from the
ensemble's mean probabilities (:attr:`~medseg.inference.case_output.FinishedCase.class_probability`) and the
input image's first channel, applies the connected-component/morphology rules on the result (the rules the
predictor would have applied to the plain argmax), and writes it into ``case.labels`` in place, so the file
written and every later hook (statistics, instances, DICOM) see the CRF's labels. Region-based plans are not
supported (their outputs are overlapping regions, not classes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.inference.case_output import FinishedCase
from medseg.postprocessing.case_reports import read_case_image
from medseg.postprocessing.crf import CrfParams, crf_labels
from medseg.postprocessing.operations import apply_postprocessing

__all__ = ["CrfPostprocess", "crf_params_of"]

logger = logging.getLogger(__name__)

#: key of the CRF settings in the postprocessing rules (``WORK/postprocessing.json``), written by find-best
CRF_KEY = "crf"


def crf_params_of(rules: Mapping[str, Any] | None) -> CrfParams | None:
    """The CRF settings find-best stored in ``rules`` (None: the CRF was not kept, or no rules).

    Raises:
        MedsegError: the stored settings are invalid.
    """
    if not rules or not rules.get(CRF_KEY):
        return None
    return CrfParams.from_dict(rules[CRF_KEY])


class CrfPostprocess:
    """Case hook replacing a case's label map by the CRF's (see the module docstring).

    Args:
        params: CRF settings.
        rules: the postprocessing rules applied after the CRF (None: none).

    Attributes:
        seconds: CRF time per case id (s).
    """

    def __init__(self, params: CrfParams, rules: Mapping[str, Any] | None) -> None:
        self.params = params
        self.rules = rules
        self.seconds: dict[str, float] = {}

    def __call__(self, case: FinishedCase) -> None:
        """Rewrite ``case.labels`` with the CRF's label map (then the rules).

        Raises:
            MedsegError: a region-based plan, or an unreadable image.
        """
        if case.class_probability is None:
            raise MedsegError(f"{case.case_id}: the CRF needs class probabilities; region-based plans have none")
        start = time.perf_counter()
        probs = np.stack([case.class_probability(label) for label in case.label_ids])
        image = read_case_image(case).astype(np.float32)
        labels = crf_labels(probs, image, case.geometry.spacing, case.label_ids, self.params)
        case.labels[...] = apply_postprocessing(labels, self.rules, case.geometry.spacing).astype(case.labels.dtype)
        self.seconds[case.case_id] = time.perf_counter() - start
        logger.info("%s: CRF %.2f s", case.case_id, self.seconds[case.case_id])
