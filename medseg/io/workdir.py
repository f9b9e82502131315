"""The work folder's layout, known here and nowhere else.

A work folder (``WORK``, written by ``medseg plan`` and filled by ``train``/``find-best``)::

    WORK/plans.json                                   the plan
    WORK/fingerprint.json                             the dataset fingerprint
    WORK/dataset_ref.json                             where the raw dataset lies (reference labels)
    WORK/splits.json                                  cross-validation splits by case
    WORK/best.json                                    find-best's choice
    WORK/postprocessing.json                          find-best's rules
    WORK/preprocessed/<data_identifier>/              preprocessed cases of a configuration
    WORK/preprocessed/<cascade>_from_<previous>/      a cascade's previous-stage segmentations
    WORK/runs/<configuration>/<arch>/fold_<k>/        one training run (``fold_all``: every case)
    WORK/soft_targets/<configuration>/<key>/<case>.npy  a teacher ensemble's float16 probabilities (distillation)

A run folder (:class:`RunDir`) holds ``checkpoint_{latest,best,final}.pt`` (``checkpoint_snapshot_<i>.pt`` too
after ``train --snapshots``), ``config.json``, ``plans.json``,
``progress.json``, ``training_log.txt``, ``training_curves.png``, ``postprocessing_prior.json``, ``.lock``
and ``validation/`` (``<case>.nii.gz``, ``<case>.npz``, ``metrics.json``).

A model bundle (:class:`BundleLayout`, ``medseg export``) is a zip with ``manifest.json``, ``plans.json``,
``preprocessing.json``, ``postprocessing.json``, ``best.json``, ``training_range.json``, ``MODEL_CARD.md``
and ``members/<config>/<arch>/fold_<k>/`` (``model.pt``, ``plans.json``).

Every path is a plain :class:`~pathlib.Path`; nothing here creates, reads or checks files except the
discovery methods (:meth:`WorkDir.fold_runs`, :meth:`WorkDir.run_pairs`, :meth:`RunDir.checkpoints_present`,
:meth:`RunDir.validation_files`), which list what exists.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

#: The fold of a run on every case (``--fold all``).
ALL = "all"
_FOLD = re.compile(r"^fold_(\d+|all)$")
_CHECKPOINT = re.compile(r"^checkpoint_(.+)\.pt$")
_SNAPSHOT = re.compile(r"^snapshot_([1-9]\d*)$")


def fold_name(fold: int | str) -> str:
    """The run folder name of a fold: ``fold_0``, ... or ``fold_all``."""
    return f"fold_{fold}"


def parse_fold(name: str) -> int | str | None:
    """The fold of a run folder name (``fold_3`` -> 3, ``fold_all`` -> ``"all"``); None for other names."""
    m = _FOLD.match(name)
    if m is None:
        return None
    return ALL if m.group(1) == ALL else int(m.group(1))


def _fold_key(name: str) -> tuple[bool, int]:
    """Sort key of fold folder names: numbered folds in order, then ``fold_all``."""
    fold = parse_fold(name)
    return (fold == ALL, fold if isinstance(fold, int) else 0)


@dataclass(frozen=True)
class RunDir:
    """One run folder, ``WORK/runs/<configuration>/<arch>/fold_<k>``, and the files in it.

    Args:
        path: the run folder (it need not exist).
    """

    path: Path

    LOCK = ".lock"
    POSTPROCESSING_PRIOR = "postprocessing_prior.json"
    VALIDATION_METRICS = "metrics.json"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def fold_name(self) -> str:
        """The folder name: ``fold_<k>`` or ``fold_all``."""
        return self.path.name

    @property
    def fold(self) -> int | str | None:
        """The fold (an int, ``"all"``), None when the folder is not named like a fold."""
        return parse_fold(self.path.name)

    @property
    def configuration(self) -> str:
        """The configuration folder above the run (``runs/<configuration>/<arch>/fold_<k>``)."""
        return self.path.parent.parent.name

    @property
    def arch(self) -> str:
        """The architecture folder above the run."""
        return self.path.parent.name

    @property
    def in_runs_folder(self) -> bool:
        """Whether the folder lies at ``runs/<configuration>/<arch>/<fold>`` (so its place names its network)."""
        return self.path.parent.parent.parent.name == "runs"

    @staticmethod
    def checkpoint_file(name: str) -> str:
        """The file name ``checkpoint_<name>.pt`` (``name``: ``latest``, ``best``, ``final``), for messages."""
        return f"checkpoint_{name}.pt"

    def checkpoint(self, name: str) -> Path:
        """``checkpoint_<name>.pt`` (``name``: ``latest``, ``best``, ``final``)."""
        return self.path / self.checkpoint_file(name)

    @staticmethod
    def snapshot_name(index: int) -> str:
        """The checkpoint name of the snapshot at the end of cosine cycle ``index`` (1, 2, ...): ``snapshot_<index>``."""
        return f"snapshot_{index}"

    @staticmethod
    def is_snapshot_name(name: str) -> bool:
        """Whether ``name`` is a snapshot's checkpoint name (``snapshot_1`` ...)."""
        return _SNAPSHOT.match(name) is not None

    def snapshots_present(self) -> list[str]:
        """Checkpoint names of the snapshots in the folder (``snapshot_1``, ``snapshot_2``, ...), by cycle."""
        names = [m.group(1) for f in self.checkpoints_present() if (m := _CHECKPOINT.match(f))]
        return sorted((n for n in names if self.is_snapshot_name(n)), key=lambda n: int(n.split("_")[1]))

    def checkpoints_present(self) -> list[str]:
        """File names of the checkpoints in the folder, sorted (empty when the folder does not exist)."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if _CHECKPOINT.match(p.name))

    @property
    def config(self) -> Path:
        """``config.json``: the run's resolved training settings."""
        return self.path / "config.json"

    @property
    def run_record(self) -> Path:
        """``run_record.json``: what happened in the run (budget fit, pretrained weights, precision check); older
        runs kept these keys in ``config.json``."""
        return self.path / "run_record.json"

    @property
    def plans(self) -> Path:
        """``plans.json``: the plan the run trained with (a budget refit's included)."""
        return self.path / "plans.json"

    @property
    def progress(self) -> Path:
        """``progress.json``: status and per-epoch history."""
        return self.path / "progress.json"

    @property
    def training_log(self) -> Path:
        """``training_log.txt``."""
        return self.path / "training_log.txt"

    @property
    def training_curves(self) -> Path:
        """``training_curves.png``."""
        return self.path / "training_curves.png"

    @property
    def postprocessing_prior(self) -> Path:
        """``postprocessing_prior.json``: rules decided from the training labels."""
        return self.path / self.POSTPROCESSING_PRIOR

    @property
    def lock(self) -> Path:
        """``.lock``, held while a process trains the run."""
        return self.path / self.LOCK

    @property
    def validation(self) -> Path:
        """``validation/``: the final validation's predictions of the held-out cases."""
        return self.path / "validation"

    @property
    def validation_metrics(self) -> Path:
        """``validation/metrics.json``."""
        return self.validation / self.VALIDATION_METRICS

    def validation_file(self, case_id: str, suffix: str) -> Path:
        """``validation/<case_id><suffix>`` (``suffix``: ``.nii.gz`` segmentation, ``.npz`` probabilities)."""
        return self.validation / f"{case_id}{suffix}"

    def validation_files(self, suffix: str) -> dict[str, Path]:
        """Case id -> ``validation/<case_id><suffix>`` of the files present, sorted by file name."""
        folder = self.validation
        if not folder.is_dir():
            return {}
        return {p.name[: -len(suffix)]: p for p in sorted(folder.glob(f"*{suffix}"))}


@dataclass(frozen=True)
class WorkDir:
    """A work folder (see the module docstring for its layout).

    Args:
        root: the work folder (it need not exist).
    """

    root: Path

    PLANS = "plans.json"
    FINGERPRINT = "fingerprint.json"
    POSTPROCESSING = "postprocessing.json"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def plans(self) -> Path:
        """``WORK/plans.json``."""
        return self.root / self.PLANS

    @property
    def fingerprint(self) -> Path:
        """``WORK/fingerprint.json``."""
        return self.root / self.FINGERPRINT

    @property
    def dataset_ref(self) -> Path:
        """``WORK/dataset_ref.json``: the raw dataset's folder and cases."""
        return self.root / "dataset_ref.json"

    @property
    def splits(self) -> Path:
        """``WORK/splits.json``."""
        return self.root / "splits.json"

    @property
    def best(self) -> Path:
        """``WORK/best.json``: find-best's result."""
        return self.root / "best.json"

    @property
    def postprocessing(self) -> Path:
        """``WORK/postprocessing.json``: find-best's postprocessing rules."""
        return self.root / self.POSTPROCESSING

    @property
    def preprocessed_root(self) -> Path:
        """``WORK/preprocessed``."""
        return self.root / "preprocessed"

    def preprocessed(self, data_identifier: str) -> Path:
        """``WORK/preprocessed/<data_identifier>``: the preprocessed cases of a configuration."""
        return self.preprocessed_root / data_identifier

    def soft_targets(self, configuration: str, key: str) -> Path:
        """``WORK/soft_targets/<configuration>/<key>``: a teacher ensemble's probabilities on the preprocessed
        training cases of ``configuration`` (``<case>.npy``), ``key`` naming the teachers (``train --distill-from``)."""
        return self.root / "soft_targets" / configuration / key

    def previous_stage(self, configuration: str, previous: str) -> Path:
        """``WORK/preprocessed/<configuration>_from_<previous>``: a cascade's previous-stage segmentations."""
        return self.preprocessed_root / f"{configuration}_from_{previous}"

    @property
    def runs_root(self) -> Path:
        """``WORK/runs``."""
        return self.root / "runs"

    def arch_runs(self, configuration: str, arch: str) -> Path:
        """``WORK/runs/<configuration>/<arch>``: the fold folders of one network."""
        return self.runs_root / configuration / arch

    def run(self, configuration: str, arch: str, fold: int | str) -> RunDir:
        """``WORK/runs/<configuration>/<arch>/fold_<fold>``."""
        return RunDir(self.arch_runs(configuration, arch) / fold_name(fold))

    def fold_runs(self, configuration: str, arch: str) -> dict[str, RunDir]:
        """The fold folders present of one network: ``{"fold_0": run, ..., "fold_all": run}``, sorted by fold."""
        base = self.arch_runs(configuration, arch)
        if not base.is_dir():
            return {}
        found = {d.name: RunDir(d) for d in base.iterdir() if d.is_dir() and _FOLD.match(d.name)}
        return dict(sorted(found.items(), key=lambda kv: _fold_key(kv[0])))

    def run_pairs(self) -> list[tuple[str, str]]:
        """``(configuration, arch)`` of every network folder under ``WORK/runs``, sorted."""
        if not self.runs_root.is_dir():
            return []
        return [
            (c.name, a.name)
            for c in sorted(p for p in self.runs_root.iterdir() if p.is_dir())
            for a in sorted(p for p in c.iterdir() if p.is_dir())
        ]

    def run_label(self, run: RunDir | Path) -> str:
        """``<configuration>/<arch>/fold_<k>``: a run folder relative to ``WORK/runs``, for messages."""
        path = run.path if isinstance(run, RunDir) else Path(run)
        return str(path.relative_to(self.runs_root))


class BundleLayout:
    """File names inside a model bundle (``medseg export``); zip member names, ``/``-separated."""

    MANIFEST = "manifest.json"
    PLANS = "plans.json"
    PREPROCESSING = "preprocessing.json"
    POSTPROCESSING = "postprocessing.json"
    BEST = "best.json"
    TRAINING_RANGE = "training_range.json"
    MODEL_CARD = "MODEL_CARD.md"
    WEIGHTS = "model.pt"

    @staticmethod
    def member(configuration: str, arch: str, fold: str) -> str:
        """``members/<configuration>/<arch>/<fold>`` (``fold``: a fold folder name, ``fold_<k>``)."""
        return f"members/{configuration}/{arch}/{fold}"

    @classmethod
    def member_weights(cls, member: str) -> str:
        """``<member>/model.pt``."""
        return f"{member}/{cls.WEIGHTS}"

    @classmethod
    def member_plans(cls, member: str) -> str:
        """``<member>/plans.json``: a member trained with another plan than the bundle's."""
        return f"{member}/{cls.PLANS}"
