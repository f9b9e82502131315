"""Postprocessing of predicted label maps: connected components (also a minimum component volume in mL,
:mod:`~medseg.postprocessing.volume_fit`) and morphology, fitted on cross-validation
(:mod:`~medseg.postprocessing.fit`, :mod:`~medseg.postprocessing.search_cases`) or, without it, decided from the training labels' component statistics
(:mod:`~medseg.postprocessing.prior`); instance maps, one id per object (:mod:`~medseg.postprocessing.instances`,
written by ``medseg predict --instances``: :mod:`~medseg.postprocessing.instance_output`); per-structure
statistics and preview images (``--statistics``: :mod:`~medseg.postprocessing.structure_statistics`,
:mod:`~medseg.postprocessing.statistics_output`; ``--preview``: :mod:`~medseg.postprocessing.preview`), also for
cases skipped because their segmentation existed (:mod:`~medseg.postprocessing.case_reports`); calibrated
probabilities, uncertainty maps and the per-case quality verdict of ``quality.json``
(:mod:`~medseg.postprocessing.calibration`, :mod:`~medseg.postprocessing.quality_features`,
:mod:`~medseg.postprocessing.quality_output`)."""

from __future__ import annotations

from medseg.postprocessing.case_reports import Revisited, revisit_skipped
from medseg.postprocessing.fit import DEFAULT_FRACTIONS, describe_rules, fit_postprocessing
from medseg.postprocessing.instance_output import INSTANCES_FILE, InstanceWriter, instance_map_path
from medseg.postprocessing.instances import Instance, InstanceOptions, find_instances
from medseg.postprocessing.operations import (
    RULES_FORMAT,
    apply_postprocessing,
    keep_components,
    load_rules,
    save_rules,
)
from medseg.postprocessing.preview import PREVIEW_DIR, PreviewWriter, render_preview
from medseg.postprocessing.prior import PRIOR_FILE, prior_rules, record_prior
from medseg.postprocessing.quality_output import QUALITY_FILE, UNCERTAINTY_DIR, QualityWriter, uncertainty_path
from medseg.postprocessing.statistics_output import STATISTICS_CSV, STATISTICS_FILE, StatisticsWriter
from medseg.postprocessing.structure_statistics import StructureStatistics, structure_statistics

__all__ = [
    "DEFAULT_FRACTIONS",
    "INSTANCES_FILE",
    "Instance",
    "InstanceOptions",
    "InstanceWriter",
    "PREVIEW_DIR",
    "PRIOR_FILE",
    "PreviewWriter",
    "QUALITY_FILE",
    "QualityWriter",
    "RULES_FORMAT",
    "Revisited",
    "STATISTICS_CSV",
    "STATISTICS_FILE",
    "StatisticsWriter",
    "StructureStatistics",
    "UNCERTAINTY_DIR",
    "apply_postprocessing",
    "describe_rules",
    "find_instances",
    "fit_postprocessing",
    "instance_map_path",
    "keep_components",
    "load_rules",
    "prior_rules",
    "record_prior",
    "render_preview",
    "revisit_skipped",
    "save_rules",
    "structure_statistics",
    "uncertainty_path",
]
