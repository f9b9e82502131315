"""Snapshot ensembles: a run with ``snapshots`` saves a checkpoint per cosine cycle, and predict ensembles them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from medseg.ensembling import work_dir_predictor
from medseg.errors import MedsegError
from medseg.inference.members import load_member
from medseg.io.workdir import RunDir
from medseg.training import TrainConfig, load_checkpoint, train

FAST = dict(iters_per_epoch=3, val_iters=1, num_workers=0, num_threads=1, precision="fp32", seed=3)
SNAPSHOTS = dict(lr_schedule="cosine_restarts", cosine_cycles=3, cosine_cycle_growth=1.0, snapshots=True)


def test_a_run_saves_one_snapshot_per_cycle_and_predict_uses_each(tiny_work):
    cfg = TrainConfig(epochs=2, final_validation=False, **FAST, **SNAPSHOTS)  # 6 iterations, cycles of 2
    runs = [RunDir(train(tiny_work, dataclasses.replace(cfg, fold=fold))) for fold in (0, 1)]
    for run in runs:
        assert run.snapshots_present() == ["snapshot_1", "snapshot_2", "snapshot_3"]
        ckpts = [load_checkpoint(run.checkpoint(name)) for name in run.snapshots_present()]
        assert [c["iteration"] for c in ckpts] == [2, 4, 6]  # the end of each cycle
        assert load_checkpoint(run.checkpoint("latest"))["scheduler"]["snapshots_saved"] == 3
        final = load_checkpoint(run.checkpoint("final"))["model"]
        assert all(torch.equal(final[k], ckpts[-1]["model"][k]) for k in final)  # the last cycle ends the run
        assert not all(torch.equal(ckpts[0]["model"][k], ckpts[1]["model"][k]) for k in final)

    predictor = work_dir_predictor(tiny_work, checkpoint="snapshots", postprocessing=False)
    sources = [m.source for m in predictor.members]
    assert len(sources) == 6  # 3 members per fold
    for run in runs:
        assert sorted(s for s in sources if s.startswith(str(run.path))) == [
            str(run.checkpoint(f"snapshot_{i}")) for i in (1, 2, 3)
        ]
    assert len(work_dir_predictor(tiny_work, folds=[1], checkpoint="snapshots", postprocessing=False).members) == 3
    assert len(work_dir_predictor(tiny_work, checkpoint="final", postprocessing=False).members) == 2

    image = np.random.default_rng(0).standard_normal((1, 10, 20, 20)).astype(np.float32)
    single = work_dir_predictor(tiny_work, folds=[0], checkpoint="snapshots", postprocessing=False, use_tta=False)
    labels = single.predict_array(image, (2.0, 1.0, 1.0))
    assert labels.shape == (10, 20, 20) and set(np.unique(labels)) <= {0, 1, 2, 3}


def test_a_run_without_snapshots_is_not_a_snapshot_ensemble(tiny_work):
    train(tiny_work, TrainConfig(epochs=1, final_validation=False, **FAST))
    with pytest.raises(MedsegError, match="snapshot_1"):
        work_dir_predictor(tiny_work, checkpoint="snapshots", postprocessing=False)
    with pytest.raises(MedsegError, match="checkpoint must be one of"):
        load_member(tiny_work / "runs" / "3d_fullres" / "unet" / "fold_0", "snapshots")
