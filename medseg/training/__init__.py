"""Training: ``train(work_dir, TrainConfig(...))`` -> run folder ``WORK/runs/<config>/<arch>/fold_<k>/``.

Public API::

    TrainConfig, AugmentationConfig          # settings, saved as run_dir/config.json
    RunRecord, read_run_record(run_dir)      # what a run did, saved as run_dir/run_record.json
    train(work_dir, cfg, resume=False) -> Path
    load_model_from_run(run_dir, checkpoint="final", device="cpu") -> (model, plan, configuration, arch)
    load_checkpoint(path) / save_checkpoint(state, path)
    make_splits / load_or_create_splits / fold_cases   # WORK/splits.json

Losses (:mod:`medseg.training.losses`), patch sampling (:mod:`medseg.training.data`), augmentation
(spatial: :mod:`medseg.training.augmentation`, intensity: :mod:`medseg.training.intensity_augmentation`), the
loop (:mod:`medseg.training.trainer`, its epochs in :mod:`medseg.training.trainer_epoch`) and its device,
precision and thread defaults (:mod:`medseg.training.device`) are importable on their own; so is fine-tuning
from pretrained weights (``TrainConfig(pretrained="model.zip")``, :mod:`medseg.training.pretrained`).
"""

from __future__ import annotations

from medseg.io.checkpoint import load_checkpoint, save_checkpoint
from medseg.training.config import AugmentationConfig, TrainConfig
from medseg.training.run import load_model_from_run, read_run_record, run_dir_for, train
from medseg.training.run_record import RunRecord
from medseg.training.splits import fold_cases, load_or_create_splits, make_splits

__all__ = [
    "AugmentationConfig",
    "RunRecord",
    "TrainConfig",
    "fold_cases",
    "load_checkpoint",
    "load_model_from_run",
    "load_or_create_splits",
    "make_splits",
    "read_run_record",
    "run_dir_for",
    "save_checkpoint",
    "train",
]
