"""find-best's quality fit carries the training volume statistics of the work folder's fingerprint, the
per-label ones and the joint ones, exactly as ``medseg predict`` builds them without find-best."""

from __future__ import annotations

import numpy as np

from medseg.ensembling.quality_fit import fit_quality
from medseg.fingerprint import CaseFingerprint, Fingerprint
from medseg.io.workdir import WorkDir
from medseg.postprocessing.quality_features import QualityModel
from medseg.postprocessing.quality_reference import reference_quality_model


def test_fit_carries_the_fingerprint_volume_statistics(tmp_path):
    rng = np.random.default_rng(1)
    cases = tuple(
        CaseFingerprint(
            f"c{i}", (2.0, 1.0, 1.0), (8, 8, 8), (8, 8, 8), 1.0, {1: int(a), 2: int(b)}, {1: (int(a),), 2: (int(b),)}
        )
        for i, (a, b) in enumerate(rng.integers(50, 400, size=(9, 2)))
    )
    work = tmp_path / "work"
    work.mkdir()
    Fingerprint("t", ("mr",), (0, 1, 2), cases, ()).save(WorkDir(work).fingerprint)
    ref = np.zeros((4, 6, 6), np.int64)
    ref[1:3, 1:4, 1:4], ref[1:3, 4:6, 4:6] = 1, 2
    probs = np.stack([ref == k for k in (0, 1, 2)]).astype(np.float32) * 0.8 + 0.2 / 3

    fitted = fit_quality(work, ["a", "b"], lambda c: probs, lambda c: ref, (0, 1, 2), None)
    model = QualityModel.from_dict(fitted["quality"])
    heuristic = reference_quality_model(work, (0, 1, 2))
    assert model.source == "cross-validation" and heuristic.source == "heuristic"
    assert model.volumes == heuristic.volumes and set(model.volumes) == {"1", "2"}
    assert model.joint_volumes is not None and model.joint_volumes == heuristic.joint_volumes
    assert model.joint_volumes.labels == ("1", "2") and model.joint_volumes.num_cases == 9
