"""find-best's ensemble-rule report: every rule scored on the CV for a multi-member winner, none for one member."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.ensembling.rule_report import ensemble_rule_report
from medseg.options import EnsembleMethod


def _npz(root: Path, member: str, fold: int, case: str, probs: np.ndarray) -> Path:
    path = root / member / f"fold_{fold}" / "validation" / f"{case}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, probabilities=probs.astype(np.float32))
    return path


def test_every_rule_is_scored_and_the_best_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    refs, preds = {}, {("c", "good"): {}, ("c", "noisy"): {}}
    for i in range(4):
        case = f"case{i}"
        ref = (rng.random((4, 6, 6)) > 0.6).astype(np.int64) * 2  # label ids 0 and 2
        refs[case] = ref
        good = np.stack([np.where(ref == 0, 0.9, 0.1), np.where(ref == 2, 0.9, 0.1)])
        noise = rng.random((4, 6, 6))
        noisy = np.stack([noise, 1 - noise])
        preds[("c", "good")][case] = _npz(tmp_path, "good", i % 2, case, good)
        preds[("c", "noisy")][case] = _npz(tmp_path, "noisy", i % 2, case, noisy)

    def load(path: Path) -> np.ndarray:
        with np.load(path) as f:
            return f["probabilities"]

    report = ensemble_rule_report(
        [("c", "good"), ("c", "noisy")], preds, sorted(refs), load, refs.__getitem__, [0, 2], None
    )
    scores = report["ensemble_rules"]
    assert set(scores) == {str(m) for m in EnsembleMethod}
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert report["ensemble_rule"] == max(scores, key=scores.__getitem__)
    # the fitted rules learn to trust the good member: they beat the plain mean
    assert max(scores["weighted"], scores["stacking"]) > scores["mean"]
    assert ensemble_rule_report([("c", "good")], preds, sorted(refs), load, refs.__getitem__, [0, 2], None) == {}
