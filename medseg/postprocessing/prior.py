"""Postprocessing without cross-validation: connected-component rules decided from the reference labels.

``medseg find-best`` fits postprocessing on cross-validation predictions. A run without them (``--fold all``,
or the README's ``train --fold 0`` then ``predict``) still knows the topology of its training references:
the fingerprint records, per case and class, the sizes of the class's connected components
(:attr:`medseg.fingerprint.CaseFingerprint.class_component_sizes`). A rule is safe on unseen data when it
would leave the *references themselves* (nearly) intact, i.e. cost a perfect prediction (nearly) nothing,
in (nearly) every training case:

- A case *keeps* a class under a rule when the rule, applied to the case's reference mask of that class,
  keeps at least ``1 - SPECK_FRACTION`` = 99 % of its voxels (Dice of the rule's output against the
  reference >= 0.995). Annotation specks, together under 1 % of a class's voxels, therefore do not veto.
- Candidates, most aggressive first: ``largest_component``, then ``remove_small`` with each fraction of
  :data:`~medseg.postprocessing.fit.DEFAULT_FRACTIONS` from the largest down. A ``remove_small`` fraction
  ``f`` is judged at ``MARGIN x f`` (a predicted genuine part may be under-segmented relative to the
  largest one; a factor 2 leaves room), so where references hold two genuine parts the rule removes only
  components much smaller than both.
- The first candidate kept by at least ``COVERAGE`` = 95 % of the cases that contain the class is chosen.
  With 20 cases one case may break it; with 10-19 none may.
- Fewer than ``MIN_CASES`` = 10 cases with the class: no rule (thin evidence; nnU-Net applies none without
  cross-validation). When every one of ``n`` references is kept, the rate of unseen cases that the rule
  would damage is below ``1 - 0.05 ** (1 / n)`` at 95 % confidence: 26 % at 10 cases, 14 % at 20,
  1.5 % at 200.

The fingerprint counts components with face connectivity, the rules remove them with full connectivity
(:mod:`medseg.postprocessing.operations`); a full-connectivity component is one or more face components,
so the statistics overstate fragmentation and the decision errs towards no rule. No all-foreground step is
decided (the fingerprint has no statistics of the union of the classes; touching organs would make it
unsafe to guess). Region-based plans and partially annotated datasets (an ignore label: scribbles say
nothing of the structure's topology) get no rule.

The decision of a run is recorded as ``RUN/postprocessing_prior.json`` (:data:`PRIOR_FILE`, rules format
of :mod:`medseg.postprocessing.operations` plus ``source``, ``evidence`` and ``thresholds``); ``medseg
predict`` applies it when no ``WORK/postprocessing.json`` fitted by find-best applies to the ensemble.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.fingerprint import Fingerprint
from medseg.io.workdir import RunDir, WorkDir
from medseg.postprocessing.fit import DEFAULT_FRACTIONS, describe_rules
from medseg.postprocessing.operations import RULES_FORMAT, load_rules, save_rules

logger = logging.getLogger(__name__)

#: Name of a run folder's recorded decision.
PRIOR_FILE = RunDir.POSTPROCESSING_PRIOR
#: ``source`` of rules decided from the label statistics (find-best's rules have none).
PRIOR_SOURCE = "label_statistics"
#: Components holding together less than this fraction of a class's voxels in a case are specks.
SPECK_FRACTION = 0.01
#: Share of the cases with the class that must keep it under the chosen rule.
COVERAGE = 0.95
#: Fewest cases with the class that may decide a rule.
MIN_CASES = 10
#: A ``remove_small`` fraction is judged at this multiple of itself.
MARGIN = 2.0


@dataclass(frozen=True)
class ClassEvidence:
    """Component statistics of one class over the cases that contain it.

    Attributes:
        num_cases: cases whose reference holds the class.
        single_component_cases: cases whose largest component holds >= 99 % of the class's voxels.
        min_largest_share: smallest share of the class's voxels in its largest component (1.0 = always one).
        needed_ratios: per case, ascending: size of the smallest component still needed to reach 99 % of
            the class's voxels (components taken largest first), divided by the largest's size; 1.0 when
            the largest alone holds 99 %. A ``remove_small`` fraction ``f`` keeps the case iff ``f <=`` it.
    """

    num_cases: int
    single_component_cases: int
    min_largest_share: float
    needed_ratios: tuple[float, ...]

    def kept_cases(self, step: Mapping[str, Any], margin: float = MARGIN) -> int:
        """Cases that keep >= 99 % of the class's voxels under ``step`` (``remove_small`` judged at
        ``margin`` x its fraction)."""
        if step["op"] == "largest_component":
            return self.single_component_cases
        threshold = margin * float(step["fraction"])
        return sum(r >= threshold for r in self.needed_ratios)

    def to_dict(self) -> dict[str, Any]:
        ratios = self.needed_ratios
        return {
            "num_cases": self.num_cases,
            "single_component_cases": self.single_component_cases,
            "min_largest_share": round(self.min_largest_share, 6),
            "needed_ratio_min": round(min(ratios), 6) if ratios else None,
            "needed_ratio_q05": round(_lower_quantile(ratios, COVERAGE), 6) if ratios else None,
        }


def _lower_quantile(sorted_values: Sequence[float], coverage: float) -> float:
    """Largest value ``v`` of ``sorted_values`` (ascending) with at least ``coverage`` of them ``>= v``."""
    allowed = math.floor((1.0 - coverage) * len(sorted_values) + 1e-9)
    return float(sorted_values[allowed])


def class_evidence(component_sizes: Iterable[Sequence[int]], speck_fraction: float = SPECK_FRACTION) -> ClassEvidence:
    """Evidence of one class from its component sizes in each case that contains it.

    Args:
        component_sizes: per case, the class's component sizes in voxels (any order; empty or all-zero
            entries are cases without the class and are skipped).
        speck_fraction: components together under this fraction of the class's voxels are specks.

    Returns:
        :class:`ClassEvidence`.
    """
    shares: list[float] = []
    ratios: list[float] = []
    for sizes in component_sizes:
        s = sorted((int(v) for v in sizes if int(v) > 0), reverse=True)
        total = sum(s)
        if total == 0:
            continue
        shares.append(s[0] / total)
        need = (1.0 - speck_fraction) * total
        acc = 0
        for v in s:
            acc += v
            if acc >= need - 1e-9:
                ratios.append(v / s[0])
                break
    single = sum(share >= 1.0 - speck_fraction - 1e-12 for share in shares)  # not ratio 1: two equal halves
    return ClassEvidence(
        num_cases=len(shares),
        single_component_cases=single,
        min_largest_share=min(shares, default=1.0),
        needed_ratios=tuple(sorted(ratios)),
    )


def candidate_steps(fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[dict[str, Any]]:
    """Candidate steps, most aggressive first: ``largest_component``, then ``remove_small`` by fraction
    from the largest down."""
    return [{"op": "largest_component"}] + [
        {"op": "remove_small", "fraction": float(f)} for f in sorted(fractions, reverse=True)
    ]


def decide_class(
    evidence: ClassEvidence,
    *,
    min_cases: int = MIN_CASES,
    coverage: float = COVERAGE,
    margin: float = MARGIN,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> tuple[dict[str, Any] | None, str]:
    """The step for one class (see the module docstring), or None, and the reason in words."""
    n = evidence.num_cases
    if n < min_cases:
        return None, f"{n} case(s) with the class, fewer than {min_cases}: too little evidence"
    need = math.ceil(coverage * n - 1e-9)
    for step in candidate_steps(fractions):
        kept = evidence.kept_cases(step, margin)
        if kept >= need:
            if step["op"] == "largest_component":
                why = "the largest component holds >= 99 % of the voxels"
            else:
                why = f"components >= {margin:g} x {step['fraction']:.4g} of the largest hold >= 99 % of the voxels"
            return step, f"{why} in {kept} of {n} cases (>= {coverage * 100:.0f} % needed)"
    return None, (
        f"genuine components as small as {evidence.needed_ratios[0]:.3g} of the largest: no size "
        f"threshold keeps >= 99 % of the voxels in {coverage * 100:.0f} % of the {n} cases"
    )


def prior_rules(
    fingerprint: Fingerprint,
    case_ids: Sequence[str] | None = None,
    *,
    region_based: bool = False,
    min_cases: int = MIN_CASES,
    coverage: float = COVERAGE,
    margin: float = MARGIN,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> dict[str, Any]:
    """Connected-component rules decided from the training references' component statistics.

    Args:
        fingerprint: the dataset fingerprint (``WORK/fingerprint.json``).
        case_ids: the cases that may decide (a run's training cases); None: every case of the fingerprint.
        region_based: the plan trains regions (no rule is decided).
        min_cases / coverage / margin / fractions: see the module docstring.

    Returns:
        A rules dict (:mod:`medseg.postprocessing.operations` format) with ``source`` =
        :data:`PRIOR_SOURCE`, ``num_cases``, ``thresholds`` and per class ``evidence`` (statistics,
        ``decision`` and ``reason``).

    Raises:
        MedsegError: ``case_ids`` names cases the fingerprint does not hold.
    """
    cases = list(fingerprint.cases)
    if case_ids is not None:
        by_id = {c.case_id: c for c in cases}
        unknown = sorted(set(case_ids) - set(by_id))
        if unknown:
            raise MedsegError(f"fingerprint: no case(s) {unknown[:5]}; re-run `medseg plan`")
        cases = [by_id[c] for c in sorted(set(case_ids))]
    label_ids = [int(v) for v in fingerprint.label_ids]
    rules: dict[str, Any] = {
        "format": RULES_FORMAT,
        "label_ids": label_ids,
        "foreground_largest_component": False,
        "per_label": {},
        "source": PRIOR_SOURCE,
        "num_cases": len(cases),
        "thresholds": {
            "speck_fraction": SPECK_FRACTION,
            "coverage": coverage,
            "min_cases": min_cases,
            "margin": margin,
        },
        "evidence": {},
    }
    skip = None
    if region_based:
        skip = "region-based plan: per-label rules do not apply"
    elif fingerprint.ignore_label is not None:
        skip = (
            f"partially annotated dataset (ignore label {fingerprint.ignore_label}): the references' "
            "topology is not the structures'"
        )
    for lab in label_ids:
        if lab == 0:
            continue
        ev = class_evidence(c.class_component_sizes.get(lab, ()) for c in cases)
        step, reason = (
            (None, skip)
            if skip
            else decide_class(ev, min_cases=min_cases, coverage=coverage, margin=margin, fractions=fractions)
        )
        if step is not None:
            rules["per_label"][str(lab)] = [step]
        rules["evidence"][str(lab)] = {**ev.to_dict(), "decision": _step_name(step), "reason": reason}
    return rules


def _step_name(step: Mapping[str, Any] | None) -> str:
    if step is None:
        return "none"
    return step["op"] if step["op"] != "remove_small" else f"remove_small_{step['fraction']:.4g}"


def is_prior(rules: Mapping[str, Any] | None) -> bool:
    """Whether ``rules`` were decided from label statistics (not fitted by find-best)."""
    return bool(rules and rules.get("source") == PRIOR_SOURCE)


def describe_prior(rules: Mapping[str, Any]) -> str:
    """e.g. ``"label 1: largest_component; label 2: none (3 case(s) ...)"``: every class's decision."""
    parts = []
    for lab, ev in sorted((rules.get("evidence") or {}).items(), key=lambda kv: int(kv[0])):
        parts.append(f"label {lab}: {ev['decision']}" + (f" ({ev['reason']})" if ev["decision"] == "none" else ""))
    return "; ".join(parts) or describe_rules(dict(rules))


def record_prior(
    work_dir: str | Path, run_dir: str | Path, case_ids: Sequence[str] | None = None, region_based: bool = False
) -> dict[str, Any] | None:
    """Decide the rules of a run from ``WORK/fingerprint.json`` and write them to ``run_dir/``:data:`PRIOR_FILE`.

    Args:
        work_dir: the work folder (``fingerprint.json``).
        run_dir: the run folder to record in.
        case_ids: the run's training cases; None: every case of the fingerprint.
        region_based: the plan trains regions.

    Returns:
        The rules, or None (nothing written) when the work folder has no fingerprint.
    """
    fp_path = WorkDir(work_dir).fingerprint
    if not fp_path.is_file():
        logger.info("%s not found: no postprocessing decided from the label statistics", fp_path)
        return None
    rules = prior_rules(Fingerprint.load(fp_path), case_ids, region_based=region_based)
    save_rules(rules, RunDir(run_dir).postprocessing_prior)
    logger.info(
        "postprocessing without cross-validation, from the components of %d training references: %s (recorded in %s)",
        rules["num_cases"],
        describe_prior(rules),
        RunDir(run_dir).postprocessing_prior,
    )
    return rules


def merge_priors(all_rules: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One rule set for an ensemble whose runs decided separately: per class the mildest decision (a class
    gets a step only when every run chose one; ``largest_component`` only when every run did, else the
    smallest ``remove_small`` fraction). ``evidence`` and ``num_cases`` are the first run's."""
    if not all_rules:
        raise ValueError("no rules to merge")
    first = all_rules[0]
    merged: dict[str, Any] = {**json.loads(json.dumps(first)), "per_label": {}}
    labels = set.intersection(*(set(r.get("per_label") or {}) for r in all_rules))
    for lab in sorted(labels, key=int):
        steps = [r["per_label"][lab][0] for r in all_rules]
        fractions = [float(s["fraction"]) for s in steps if s["op"] == "remove_small"]
        merged["per_label"][lab] = (
            [{"op": "remove_small", "fraction": min(fractions)}] if fractions else [{"op": "largest_component"}]
        )
    if any(dict(r.get("per_label") or {}) != merged["per_label"] for r in all_rules):
        merged["merged_from_runs"] = len(all_rules)
    return merged


def ensemble_prior(
    work_dir: str | Path,
    run_dirs: Sequence[Path],
    region_based: bool = False,
) -> tuple[dict[str, Any] | None, str]:
    """The label-statistics rules of an ensemble and where they came from, for ``medseg predict``.

    Each run's recorded :data:`PRIOR_FILE` when every run has one (merged by :func:`merge_priors` when
    they differ); otherwise decided now from every case of ``WORK/fingerprint.json`` (a run trained by
    the library's ``train()`` or before medseg recorded the decision).

    Returns:
        ``(rules or None, source in words)``.

    Raises:
        MedsegError: a recorded file is not a valid rules file.
    """
    recorded = [RunDir(d).postprocessing_prior for d in run_dirs]
    if recorded and all(p.is_file() for p in recorded):
        all_rules = [load_rules(p) for p in recorded]
        rules = all_rules[0] if len(all_rules) == 1 else merge_priors(all_rules)
        where = str(recorded[0]) if len(recorded) == 1 else f"{len(recorded)} runs' {PRIOR_FILE}"
        return rules, f"label statistics of {rules.get('num_cases', '?')} training references ({where})"
    fp_path = WorkDir(work_dir).fingerprint
    if not fp_path.is_file():
        return None, f"no {PRIOR_FILE} in the runs and no {fp_path}"
    rules = prior_rules(Fingerprint.load(fp_path), region_based=region_based)
    return rules, f"label statistics of all {rules['num_cases']} references of {fp_path}"
