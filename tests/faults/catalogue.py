"""The fault catalogue: every fault, run through the real ``medseg`` command line on tiny data.

Each scenario function injects one fault (an outside ``kill -9``, a fault armed with ``MEDSEG_FAULT_INJECT``
(:mod:`medseg.faults`), or bad input), asserts what must hold afterwards (clear message, exit code, no
traceback, nothing half-written, the rerun recovers) and returns the measured :class:`Outcome` rows.
``tests/faults/test_faults.py`` runs them as tests; ``scripts/bench_faults.py`` prints them as a table.

The data: a 5-case, 2-channel synthetic dataset in the nnU-Net v2 layout (about 12 x 24 x 24 voxels),
planned by ``medseg plan`` and trained for fold 0 for a few iterations; a 1-channel dataset trained the same
way supplies "a checkpoint from another plan".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from tests.helpers import shrink_networks

FAULT_ENV = "MEDSEG_FAULT_INJECT"
RUN = Path("runs") / "3d_fullres" / "unet" / "fold_0"
TRAIN = ["--fold", "0", "--device", "cpu", "--num-workers", "0", "--iters-per-epoch", "2", "--epochs", "2"]
KILLED = -signal.SIGKILL


# ---------------------------------------------------------------------- running the CLI
@dataclass
class Result:
    """A finished ``medseg`` process."""

    rc: int
    stdout: str
    stderr: str

    @property
    def message(self) -> str:
        """First line of the error message (the CLI's ``medseg X: error:`` line or the first failed case)."""
        if self.rc == KILLED:
            return "(killed by SIGKILL: no message)"
        lines = self.stderr.splitlines()
        for i, line in enumerate(lines):
            if ": error: " in line:  # a list of problems follows a header ending in ':'; show the first
                return line.strip() + (f" {lines[i + 1].strip()}" if line.endswith(":") and i + 1 < len(lines) else "")
        for line in self.stdout.splitlines():
            if line.startswith("  ") and ": " in line:
                return line.strip()
        return self.stdout.strip().splitlines()[0] if self.stdout.strip() else ""


def _env(fault: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def medseg(*args: str | Path, fault: str | None = None, timeout: float = 300) -> Result:
    """Run ``python -m medseg ARGS`` to completion (fault armed via ``MEDSEG_FAULT_INJECT`` when given)."""
    proc = subprocess.run(
        [sys.executable, "-m", "medseg", *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(fault),
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def medseg_background(log: Path, *args: str | Path, fault: str | None = None) -> subprocess.Popen:
    """Start ``python -m medseg ARGS`` with stdout and stderr going to ``log`` (fault armed when given)."""
    with log.open("w") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "medseg", *map(str, args)], stdout=fh, stderr=subprocess.STDOUT, env=_env(fault)
        )


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.05)


def assert_clean_error(res: Result, rc: int, *needles: str | Path) -> None:
    """Exit code ``rc``, every needle in the output, no Python traceback."""
    text = res.stdout + res.stderr
    assert res.rc == rc, f"exit code {res.rc}, expected {rc}\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    for needle in needles:
        assert str(needle) in text, f"{needle!r} not in the output:\n{text[-3000:]}"


# ---------------------------------------------------------------------- outcomes
@dataclass
class Outcome:
    """One row of the fault table."""

    fault: str
    exit_code: str
    message: str
    data_lost: str
    recovery: str


def _ckpt(path: Path) -> dict:
    from medseg.io.checkpoint import load_checkpoint

    return load_checkpoint(path)


def _tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".tmp_*")) if folder.is_dir() else []


def _outputs(folder: Path) -> list[str]:
    """Segmentations under their final names (hidden temporary files excluded)."""
    return sorted(p.name for p in folder.glob("*.nii.gz") if not p.name.startswith("."))


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ---------------------------------------------------------------------- the environment
@dataclass
class Env:
    """Prepared data shared by the scenarios (copy ``work``/``trained`` before changing them).

    Attributes:
        root: scratch folder.
        data: 2-channel dataset (5 cases, nnU-Net v2 layout).
        work: ``medseg plan`` output for ``data`` (preprocessed, nothing trained).
        trained: ``work`` with fold 0 of 3d_fullres/unet trained.
        images: 4 valid cases to predict (``CASE_0000``/``CASE_0001``).
        reference: their segmentations from an uninterrupted ``medseg predict``.
        foreign: a trained work folder of another (1-channel) dataset.
    """

    root: Path
    data: Path
    work: Path
    trained: Path
    images: Path
    reference: Path
    foreign: Path

    def copy(self, src: Path, name: str) -> Path:
        dst = self.root / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        return dst


def two_channel_dataset(out: Path, num_cases: int = 5, seed: int = 0) -> Path:
    """A synthetic 2-channel dataset in the nnU-Net v2 layout (channel 1: inverted contrast in the body)."""
    from medseg.io.synthetic import STRUCTURE_NAMES, generate_synthetic_dataset

    src = generate_synthetic_dataset(out.parent / f"{out.name}_msd", num_cases=num_cases, seed=seed, shape=(12, 24, 24))
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    for image in sorted((src / "imagesTr").glob("*.nii.gz")):
        case = image.name[: -len(".nii.gz")]
        shutil.copy(image, out / "imagesTr" / f"{case}_0000.nii.gz")
        img = sitk.ReadImage(str(image))
        arr = sitk.GetArrayFromImage(img)
        inverted = sitk.GetImageFromArray(np.where(arr > 0, arr.max() + 1.0 - arr, 0.0).astype(np.float32))
        inverted.CopyInformation(img)
        sitk.WriteImage(inverted, str(out / "imagesTr" / f"{case}_0001.nii.gz"))
        shutil.copy(src / "labelsTr" / image.name, out / "labelsTr" / image.name)
    meta = {
        "name": "MedsegTwoChannel",
        "channel_names": {"0": "T1", "1": "T1inv"},
        "labels": {name: i for i, name in enumerate(STRUCTURE_NAMES)},
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(src)
    return out


def prepare(root: Path) -> Env:
    """Build the shared data: plan (networks shrunk), train fold 0 for 2 x 2 iterations, predict 4 cases; and a
    foreign run."""
    root.mkdir(parents=True, exist_ok=True)
    data = two_channel_dataset(root / "data")
    work = root / "work"
    res = medseg("plan", data, "-o", work, "--num-workers", "1", "--device", "cpu", "--configs", "3d_fullres")
    assert_clean_error(res, 0)
    shrink_networks(work)
    trained = root / "trained"
    shutil.copytree(work, trained)
    assert_clean_error(medseg("train", trained, *TRAIN), 0)
    images = root / "images"
    images.mkdir()
    for f in sorted((data / "imagesTr").glob("case_00[0-3]_000?.nii.gz")):
        shutil.copy(f, images / f.name)
    reference = root / "reference"
    res = medseg("predict", "-i", images, "-o", reference, "-m", trained, "--device", "cpu", "--no-tta")
    assert_clean_error(res, 0)

    from medseg.io.synthetic import generate_synthetic_dataset

    other = generate_synthetic_dataset(root / "other_data", num_cases=5, seed=1, shape=(12, 24, 24))
    foreign = root / "foreign"
    assert_clean_error(
        medseg("plan", other, "-o", foreign, "--num-workers", "1", "--device", "cpu", "--configs", "3d_fullres"), 0
    )
    shrink_networks(foreign)
    assert_clean_error(medseg("train", foreign, "--no-validation", *TRAIN[:-1], "1"), 0)
    return Env(root, data, work, trained, images, reference, foreign)


# ---------------------------------------------------------------------- training
def _epoch_lines(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"medseg\.training\.trainer: epoch (\d+): loss", text)]


def _resume_point(text: str) -> tuple[int, int]:
    m = re.search(r"resuming .* at epoch (\d+), iteration (\d+)", text)
    assert m, f"no 'resuming ... at epoch' line:\n{text[-3000:]}"
    return int(m.group(1)), int(m.group(2))


def _assert_complete_run(run: Path, epochs: int, ipe: int) -> None:
    """checkpoint_final holds every epoch exactly once, the validation is written, nothing is left over."""
    final = _ckpt(run / "checkpoint_final.pt")
    assert (final["epoch"], final["iteration"]) == (epochs, epochs * ipe), (final["epoch"], final["iteration"])
    assert [h["epoch"] for h in final["history"]] == list(range(1, epochs + 1)), final["history"]
    assert json.loads((run / "validation" / "metrics.json").read_text())["iteration"] == epochs * ipe
    assert not [n for n in _tmp_files(run) if n.startswith(".tmp_ckpt_")], _tmp_files(run)
    assert not (run / ".lock").exists()


def train_concurrent_and_kill_during_epoch(env: Env) -> list[Outcome]:
    """A second ``medseg train`` of a fold being trained is refused; then ``kill -9`` of the first during an
    epoch's iterations; ``--resume`` takes the dead run's lock over and continues from checkpoint_latest.

    The first run stalls (fault ``train_step:N=stall``) after iteration ``stop``, inside its second epoch, so
    the second command and the kill find it alive mid-epoch on a machine of any speed."""
    work = env.copy(env.work, "t_epoch")
    run = work / RUN
    ipe, stop = 24, 24 + 6
    args = ["train", work, "--fold", "0", "--device", "cpu", "--num-workers", "0", "--iters-per-epoch", str(ipe)]
    log = env.root / "t_epoch.log"
    first = medseg_background(log, *args, "--epochs", "50", fault=f"train_step:{stop}=stall")
    try:
        wait_for(
            lambda: (run / "checkpoint_latest.pt").is_file() or first.poll() is not None,
            120,
            "the first checkpoint_latest.pt",
        )
        assert first.poll() is None, log.read_text()[-2000:]
        owner = json.loads((run / ".lock").read_text())
        assert owner["pid"] == first.pid, owner
        second = medseg(*args, "--epochs", "50", "--resume")
        wait_for(
            lambda: f"train_step:{stop} stalls" in log.read_text() or first.poll() is not None, 120, f"iteration {stop}"
        )
        assert first.poll() is None, log.read_text()[-2000:]
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(30) == KILLED
    finally:
        if first.poll() is None:
            first.kill()
    assert_clean_error(second, 2, "another `medseg train` is training this run", f"pid {first.pid}")
    logged = max(_epoch_lines(log.read_text()), default=0)
    ckpt = _ckpt(run / "checkpoint_latest.pt")  # it loads: complete
    assert ckpt["epoch"] == logged == stop // ipe, (ckpt["epoch"], logged)  # killed inside epoch `stop // ipe + 1`
    assert ckpt["iteration"] == stop // ipe * ipe  # only that epoch's iterations are lost
    into = stop - ckpt["iteration"]
    assert (run / ".lock").exists()  # the killed run could not remove it
    epochs = ckpt["epoch"] + 1
    res = medseg(*args, "--epochs", str(epochs), "--resume")
    assert_clean_error(
        res, 0, "taking over the lock left by a run that did not finish", f"pid {first.pid}", "no longer running"
    )
    start = _resume_point(res.stderr)
    assert start == (ckpt["epoch"], ckpt["iteration"]), start
    _assert_complete_run(run, epochs, ipe)
    warning = next(line for line in res.stderr.splitlines() if "taking over the lock" in line)
    return [
        Outcome(
            "train: a second `medseg train` of a fold being trained",
            "2",
            second.message.replace(str(work), "WORK"),
            "nothing (the running training is untouched)",
            "-",
        ),
        Outcome(
            "train: kill -9 during an epoch",
            "-9 (SIGKILL); resume 0",
            f"(killed: no message); resume: resuming at epoch {start[0]}, iteration {start[1]}",
            f"{into} iteration(s) of the current epoch (of {ipe})",
            f"--resume continues from epoch {start[0]} (checkpoint_latest)",
        ),
        Outcome(
            "train: stale lock of the killed run",
            "0 (with a warning)",
            re.sub(r"^.*?WARNING", "WARNING", warning).replace(str(work), "WORK"),
            "nothing",
            "--resume takes the lock over",
        ),
    ]


def train_checkpoint_and_validation_faults(env: Env) -> list[Outcome]:
    """On one run: SIGKILL while checkpoint_latest.pt of epoch 2 is written; on ``--resume``, a full disk at the
    next checkpoint_latest.pt; on the next ``--resume``, SIGKILL in the final validation; a last ``--resume``."""
    work = env.copy(env.work, "t_ckpt")
    run = work / RUN
    res = medseg("train", work, *TRAIN, fault="checkpoint_write:checkpoint_latest.pt@2")
    assert res.rc == KILLED, res.stderr[-3000:]
    partial = [n for n in _tmp_files(run) if n.startswith(".tmp_ckpt_")]
    assert len(partial) == 1, _tmp_files(run)  # the interrupted write stayed under its temporary name
    size = (run / partial[0]).stat().st_size
    assert _ckpt(run / "checkpoint_latest.pt")["epoch"] == 1  # the previous checkpoint, complete
    rows = [
        Outcome(
            "train: kill -9 while writing checkpoint_latest.pt",
            "-9; resume 0",
            "(killed: no message); resume: removed 1 unfinished checkpoint file(s)",
            f"epoch 2 (2 iterations); the partial file ({size // 1024} KiB) never had the final name",
            "--resume continues from epoch 1 (previous checkpoint intact)",
        )
    ]

    res = medseg("train", work, *TRAIN, "--resume", fault="checkpoint_write:checkpoint_latest.pt=enospc")
    assert_clean_error(
        res,
        2,
        "removed 1 unfinished checkpoint file",
        "checkpoint_latest.pt: cannot write the checkpoint (No space left on device); the previous checkpoint is kept",
    )
    assert _resume_point(res.stderr) == (1, 2)
    assert not _tmp_files(run), _tmp_files(run)
    assert _ckpt(run / "checkpoint_latest.pt")["epoch"] == 1
    assert not (run / ".lock").exists()
    rows.append(
        Outcome(
            "train: disk full writing a checkpoint (injected ENOSPC)",
            "2; resume 0",
            res.message.replace(str(work), "WORK"),
            "epoch 2 again; no partial file left",
            "--resume continues from epoch 1",
        )
    )

    res = medseg("train", work, *TRAIN, "--resume", fault="final_validation@1")
    assert res.rc == KILLED, res.stderr[-3000:]
    assert _resume_point(res.stderr) == (1, 2)
    assert _ckpt(run / "checkpoint_final.pt")["epoch"] == 2
    assert not (run / "validation" / "metrics.json").exists()
    res = medseg("train", work, *TRAIN, "--resume")
    assert_clean_error(res, 0, "already complete")
    assert not _epoch_lines(res.stderr)  # nothing retrained
    _assert_complete_run(run, 2, 2)
    rows.append(
        Outcome(
            "train: kill -9 during the final validation",
            "-9; resume 0",
            "(killed: no message); resume: training of ... is already complete",
            "the validation outputs so far (redone); no training",
            "--resume runs only the final validation",
        )
    )
    return rows


# ---------------------------------------------------------------------- planning / preprocessing
def _preprocessed(work: Path) -> Path:
    (folder,) = [p for p in (work / "preprocessed").iterdir() if p.is_dir()]
    return folder


def _assert_same_cache(work: Path, reference: Path) -> None:
    got, ref = _preprocessed(work), _preprocessed(reference)
    names = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names
    for name in names:
        if name.endswith(".npz"):
            with np.load(got / name) as a, np.load(ref / name) as b:
                assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files), name
        else:
            assert (got / name).read_bytes() == (ref / name).read_bytes(), name


def plan_kill_then_disk_full(env: Env) -> list[Outcome]:
    """SIGKILL after the 3rd case's .npz and before its .json (fault ``preprocess_write@3``); the rerun meets a
    full disk from its first write on; a last rerun completes the cache."""
    from medseg.planning.plan import Plan
    from medseg.preprocessing import list_preprocessed_cases

    work = env.root / "p_kill"
    plan_args = ["plan", env.data, "-o", work, "--num-workers", "1", "--device", "cpu", "--configs", "3d_fullres"]
    res = medseg(*plan_args, fault="preprocess_write@3")
    assert res.rc == KILLED, res.stderr[-3000:]
    folder = _preprocessed(work)
    assert (folder / "case_002.npz").is_file() and not (folder / "case_002.json").exists()
    usable = list_preprocessed_cases(work, Plan.load(work / "plans.json"), "3d_fullres")
    assert usable == ["case_000", "case_001"], usable  # the interrupted case is not used
    full = medseg(*plan_args, fault="preprocess_write=enospc")
    assert_clean_error(
        full,
        2,
        "2 of 5 cases already preprocessed",
        "preprocessing failed (3 problems)",
        "case_002: No space left on device",
    )
    assert not (folder / "case_002.json").exists() and not _tmp_files(folder)
    res = medseg(*plan_args)
    assert_clean_error(res, 0, "2 of 5 cases already preprocessed")
    _assert_same_cache(work, env.work)
    return [
        Outcome(
            "plan: kill -9 mid-preprocessing (after a case's .npz, before its .json)",
            "-9; rerun 0",
            "(killed: no message); rerun: 2 of 5 cases already preprocessed",
            "the interrupted case (never used: no .json), redone",
            "rerun resumes; cache equals a clean run",
        ),
        Outcome(
            "plan: disk full while preprocessing (injected ENOSPC)",
            "2; rerun 0",
            full.message,
            "the 3 cases not written (no .json: not used)",
            "rerun resumes; cache equals a clean run",
        ),
    ]


def plan_worker_killed(env: Env) -> list[Outcome]:
    """A preprocessing worker process dies (SIGKILL in the worker, like the OOM killer) with --num-workers 2."""
    work = env.root / "p_worker"
    plan_args = ["plan", env.data, "-o", work, "--num-workers", "2", "--device", "cpu", "--configs", "3d_fullres"]
    res = medseg(*plan_args, fault="preprocess_write@2")
    assert_clean_error(res, 2, "a preprocessing worker process was killed", "run `medseg plan` again")
    res2 = medseg(*plan_args)
    assert_clean_error(res2, 0)
    _assert_same_cache(work, env.work)
    return [
        Outcome(
            "plan: a preprocessing worker killed (OOM killer), --num-workers 2",
            "2; rerun 0",
            res.message,
            "the cases in flight (no .json: not used), redone",
            "rerun resumes; cache equals a clean run",
        )
    ]


# ---------------------------------------------------------------------- prediction
def _predict(env: Env, images: Path, out: Path, model: Path | None = None, fault: str | None = None) -> Result:
    return medseg(
        "predict", "-i", images, "-o", out, "-m", model or env.trained, "--device", "cpu", "--no-tta", fault=fault
    )


def _assert_like_reference(env: Env, out: Path, names: list[str]) -> None:
    for name in names:
        assert np.array_equal(_read(out / name), _read(env.reference / name)), name


def predict_kill_then_disk_full(env: Env) -> list[Outcome]:
    """SIGKILL after the 2nd of 4 segmentations was written (fault ``predict_written@2``); the rerun meets a full
    disk at every write (fault ``segmentation_write=enospc``); a last rerun fills the rest."""
    out = env.root / "pr_kill"
    res = _predict(env, env.images, out, fault="predict_written@2")
    assert res.rc == KILLED, res.stderr[-3000:]
    written = _outputs(out)
    assert 2 <= len(written) < 4, written  # the case written in the background may have finished too
    _assert_like_reference(env, out, written)  # finished outputs are complete and identical
    left = _tmp_files(out)
    full = _predict(env, env.images, out, fault="segmentation_write=enospc")
    assert_clean_error(full, 1, f"{len(written)} skipped", "cannot write the segmentation (No space left on device)")
    assert _outputs(out) == written and _tmp_files(out) == left  # no partial file, under any name
    res = _predict(env, env.images, out)
    assert_clean_error(res, 0, f"{len(written)} skipped")
    names = _outputs(env.reference)
    assert _outputs(out) == names
    _assert_like_reference(env, out, names)
    return [
        Outcome(
            "predict: kill -9 mid-folder (after 2 of 4 outputs)",
            "-9; rerun 0",
            f"(killed: no message); rerun: predicted ...; {len(written)} skipped (output exists)",
            f"nothing: {len(written)} outputs complete, the case in flight absent"
            + (f"; {len(left)} hidden .tmp_ file left behind" if left else ""),
            "rerun predicts only the missing cases; all equal an uninterrupted run",
        ),
        Outcome(
            "predict: disk full while writing (injected ENOSPC)",
            "1; rerun 0",
            full.message.replace(str(env.root), "..."),
            "nothing: no partial file under any name",
            "rerun writes the missing cases",
        ),
    ]


def _bad_folder(env: Env, folder: Path) -> dict[str, str]:
    """Two valid cases plus one bad case per kind of bad input; returns case id -> what is wrong."""
    folder.mkdir()
    for f in sorted(env.images.glob("case_00[01]_*.nii.gz")):
        shutil.copy(f, folder / f.name)
    src0, src1 = env.images / "case_000_0000.nii.gz", env.images / "case_000_0001.nii.gz"
    img = sitk.ReadImage(str(src0))
    arr = sitk.GetArrayFromImage(img)

    def write(name: str, array: np.ndarray, like: sitk.Image | None = img) -> None:
        out = sitk.GetImageFromArray(array)
        if like is not None:
            out.CopyInformation(like)
        sitk.WriteImage(out, str(folder / name))

    for c in range(3):  # one channel file too many
        shutil.copy(src0 if c != 1 else src1, folder / f"extra_{c:04d}.nii.gz")
    shutil.copy(src0, folder / "nochan.nii.gz")  # no channel suffix for a 2-channel model
    shutil.copy(src0, folder / "missing_0000.nii.gz")  # _0001 missing
    write("flat_0000.nii.gz", arr[5], None)  # 2D image for a 3D model
    write("flat_0001.nii.gz", arr[5], None)
    bad = arr.copy()
    bad[4, 5, 5], bad[5, 6, 6] = np.nan, np.inf
    write("nan_0000.nii.gz", bad)
    shutil.copy(src1, folder / "nan_0001.nii.gz")
    raw = src1.read_bytes()
    shutil.copy(src0, folder / "trunc_0000.nii.gz")
    (folder / "trunc_0001.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated .nii.gz
    shutil.copy(src0, folder / "text_0000.nii.gz")
    (folder / "text_0001.nii.gz").write_text("not an image\n")  # non-image file with an image name
    (folder / "README.txt").write_text("notes about these scans\n")  # non-image file: ignored with a warning
    return {
        "extra": "wrong channel count (3 files for a 2-channel model)",
        "nochan": "wrong channel count (CASE.nii.gz, no channel suffix)",
        "missing": "missing _0001 channel",
        "flat": "2D image for a 3D model",
        "nan": "NaN/Inf voxels",
        "trunc": "truncated .nii.gz",
        "text": "non-image file named .nii.gz",
    }


def predict_bad_inputs(env: Env) -> list[Outcome]:
    """One folder with every kind of bad case and two valid ones: each bad case named, the valid written."""
    folder = env.root / "bad_in"
    kinds = _bad_folder(env, folder)
    out = env.root / "bad_out"
    res = _predict(env, folder, out)
    assert_clean_error(res, 1, "README.txt")
    assert _outputs(out) == ["case_000.nii.gz", "case_001.nii.gz"]
    _assert_like_reference(env, out, ["case_000.nii.gz", "case_001.nii.gz"])
    assert not _tmp_files(out)
    failed = {}
    for line in res.stdout.splitlines():
        m = re.match(r"  (\w+): (.*)", line)
        if m:
            failed[m.group(1)] = m.group(2)
    assert sorted(failed) == sorted(kinds), failed
    expected = {
        "extra": "extra_0000.nii.gz",
        "nochan": "nochan.nii.gz",
        "missing": "missing_0001.nii.gz",
        "flat": "flat_0000.nii.gz",
        "nan": "nan_0000.nii.gz",
        "trunc": "trunc_0001.nii.gz",
        "text": "text_0001.nii.gz",
    }
    for case, name in expected.items():
        assert name in failed[case], (case, failed[case])  # the message names the file
    rows = [
        Outcome(
            f"predict: {kinds[c]}",
            "1 (other cases written)",
            f"{c}: {failed[c].replace(str(folder), 'IN')}",
            "nothing (valid cases of the folder written)",
            "fix the file, rerun (written cases skipped)",
        )
        for c in kinds
    ]
    warn = next(line for line in res.stderr.splitlines() if "README.txt" in line)
    rows.append(
        Outcome(
            "predict: non-image file (README.txt) in the folder",
            "unaffected",
            warn.replace(str(folder), "IN").strip(),
            "nothing",
            "-",
        )
    )
    return rows


def predict_empty_and_nested(env: Env) -> list[Outcome]:
    """An empty input folder and an output folder inside the input folder: refused before anything is written."""
    empty = env.root / "empty_in"
    empty.mkdir()
    res = _predict(env, empty, env.root / "empty_out")
    assert_clean_error(res, 2, "no images found", empty)
    assert not (env.root / "empty_out").exists()
    nested_in = env.copy(env.images, "nested_in")
    res2 = _predict(env, nested_in, nested_in / "out")
    assert_clean_error(res2, 2, "must not be the input folder or inside it")
    assert not (nested_in / "out").exists()
    return [
        Outcome("predict: empty input folder", "2", res.message.replace(str(env.root), "..."), "nothing", "-"),
        Outcome(
            "predict: output folder inside the input folder",
            "2",
            res2.message.replace(str(env.root), "..."),
            "nothing",
            "-",
        ),
    ]


class _CodeOnLoad:
    """Pickles to a call of ``os.system``: what a tampered checkpoint would carry."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def predict_bad_checkpoints(env: Env) -> list[Outcome]:
    """A checkpoint from another plan, a tampered one (pickled code) and a truncated one: refused, named."""
    import torch

    from medseg.io.checkpoint import CHECKPOINT_FORMAT

    rows = []
    out = env.root / "ck_out"
    work = env.copy(env.trained, "ck_foreign")
    target = work / RUN / "checkpoint_final.pt"
    shutil.copy(env.foreign / RUN / "checkpoint_final.pt", target)
    res = _predict(env, env.images, out, model=work)
    assert_clean_error(res, 2, target, "belongs to another plan")
    assert not out.exists()
    rows.append(
        Outcome(
            "predict: checkpoint from another plan (copied from another dataset's run)",
            "2",
            res.message.replace(str(env.root), "..."),
            "nothing",
            "put the right checkpoint back",
        )
    )

    work = env.copy(env.trained, "ck_tampered")
    target = work / RUN / "checkpoint_final.pt"
    marker = env.root / "tampered_code_ran"
    torch.save({"format": CHECKPOINT_FORMAT, "model": _CodeOnLoad(f"touch {marker}")}, target)
    with __import__("zipfile").ZipFile(target) as zf:  # the file really carries a call of os.system
        assert any(b"system" in zf.read(n) for n in zf.namelist() if n.endswith(".pkl"))
    res = _predict(env, env.images, out, model=work)
    assert_clean_error(res, 2, target, "cannot be loaded safely")
    assert not marker.exists() and not out.exists()
    rows.append(
        Outcome(
            "predict: tampered checkpoint (pickle that runs code)",
            "2",
            res.message.replace(str(env.root), "..."),
            "nothing; the code did not run",
            "-",
        )
    )

    work = env.copy(env.trained, "ck_trunc")
    target = work / RUN / "checkpoint_final.pt"
    raw = target.read_bytes()
    target.write_bytes(raw[: len(raw) // 2])
    res = _predict(env, env.images, out, model=work)
    assert_clean_error(res, 2, target, "corrupt or truncated checkpoint")
    assert not out.exists()
    rows.append(
        Outcome("predict: truncated checkpoint", "2", res.message.replace(str(env.root), "..."), "nothing", "-")
    )
    return rows


def predict_unwritable_output(env: Env) -> list[Outcome]:
    """An output folder that cannot be written: chmod 0o500, or, as root (where chmod does not stop writes),
    an output path that is a file."""
    out = env.root / "ro_out"
    out.mkdir()
    out.chmod(0o500)
    if os.access(out, os.W_OK):  # root: permissions do not apply
        out.chmod(0o700)
        out.rmdir()
        out.write_text("a file where the output folder should be\n")
        how, needle = "output path is a file (running as root: chmod 0o500 does not block writes)", "is a file"
    else:
        how, needle = "chmod 0o500 output folder", "cannot write into the output folder (Permission denied)"
    try:
        res = _predict(env, env.images, out)
    finally:
        if out.is_dir():
            out.chmod(0o700)
    assert_clean_error(res, 2, out, needle)
    assert not out.is_dir() or not list(out.iterdir())
    return [
        Outcome(f"predict: unwritable output ({how})", "2", res.message.replace(str(env.root), "..."), "nothing", "-")
    ]


SCENARIOS: tuple[Callable[[Env], list[Outcome]], ...] = (
    train_concurrent_and_kill_during_epoch,
    train_checkpoint_and_validation_faults,
    plan_kill_then_disk_full,
    plan_worker_killed,
    predict_kill_then_disk_full,
    predict_bad_inputs,
    predict_empty_and_nested,
    predict_bad_checkpoints,
    predict_unwritable_output,
)
