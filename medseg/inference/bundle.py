"""Portable model bundles: the file format of the one zip with everything prediction needs.

:func:`write_bundle` writes the networks of given run folders and, carried as they are, the postprocessing
rules and find-best's result; which runs and which rules is chosen above inference
(:func:`medseg.ensembling.bundle_export.export_bundle`, behind ``medseg export``)::

    manifest.json                                 format, format_version, medseg version, labels, members
    plans.json                                    the plan the first member was trained with
    preprocessing.json                            its spacing and per-channel normalisation, for people to read
    postprocessing.json                           the rules given to :func:`write_bundle` (only when given)
    best.json                                     find-best's result (only when given)
    training_range.json                           what the input guard checks inputs against (when given)
    MODEL_CARD.md                                 the model card, for people to read (when given)
    members/<config>/<arch>/fold_<k>/model.pt     weights only (a state dict; no optimizer state)
    members/<config>/<arch>/fold_<k>/plans.json   only for a member trained with another plan than plans.json

Each member's plan is the one stored in its checkpoint, so a bundle predicts exactly what its work folder
predicts. Weights load with ``torch.load(weights_only=True)``; nothing in a bundle can execute code.
:func:`load_bundle` refuses a truncated or corrupt zip, a missing file and a newer ``format_version`` with
one :class:`~medseg.errors.BundleError` naming the bundle; it hands ``postprocessing.json`` on as stored
(:class:`BundledFile`), for the caller to check and apply.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import torch

from medseg import __version__
from medseg.errors import BundleError, MedsegError
from medseg.inference.input_guard import TrainingRange
from medseg.inference.members import EnsembleMember, load_member
from medseg.io.image import atomic_write_stream
from medseg.io.workdir import BundleLayout, RunDir, fold_name
from medseg.planning.plan import Plan, dumps_readable
from medseg.planning.stage import Stage

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "medseg-model-bundle"
#: Bumped whenever a bundle written now could not be read by an older medseg.
BUNDLE_FORMAT_VERSION = 1
WEIGHTS_FORMAT = "medseg-bundle-weights-v1"
MANIFEST = BundleLayout.MANIFEST


def _dump(obj: Any) -> bytes:
    return (dumps_readable(obj) + "\n").encode()


def write_bundle(
    output: str | Path,
    run_dirs: Sequence[Path],
    checkpoint: str = "final",
    postprocessing: dict[str, Any] | None = None,
    best: bytes | None = None,
    training_range: TrainingRange | None = None,
    model_card: str | None = None,
) -> Path:
    """Write the networks of ``run_dirs`` to one zip, atomically (temporary file, fsync, rename).

    Args:
        output: the zip to write (replaced when it exists).
        run_dirs: the run folders (``WORK/runs/<config>/<arch>/fold_<k>``) of the ensemble, in order.
        checkpoint: ``final``, ``best`` or ``latest``.
        postprocessing: rules to carry as ``postprocessing.json`` (written as given), or None for none.
        best: the bytes of find-best's ``best.json`` to carry, or None.
        training_range: the training data's range for the input guard (``training_range.json``), or None.
        model_card: the text of ``MODEL_CARD.md``, or None.

    Returns:
        ``output``.

    Raises:
        MedsegError: no run folders, or a checkpoint is missing or does not fit its plan.
        OSError: the file system refused the write; ``output`` is left as it was.
    """
    output = Path(output)
    if not run_dirs:
        raise MedsegError(f"{output}: no networks to bundle")
    files: dict[str, bytes] = {}
    entries = []
    first_plan: dict[str, Any] | None = None
    for run_dir in run_dirs:
        member = load_member(run_dir, checkpoint)
        base = BundleLayout.member(member.configuration, member.arch, RunDir(run_dir).fold_name)
        plan_dict = member.plan.to_dict()
        if first_plan is None:
            first_plan = plan_dict
            files[BundleLayout.PLANS] = member.plan.to_json().encode()
        plan_name = BundleLayout.PLANS
        if plan_dict != first_plan:
            plan_name = BundleLayout.member_plans(base)
            files[plan_name] = member.plan.to_json().encode()
        buf = io.BytesIO()
        torch.save(
            {
                "format": WEIGHTS_FORMAT,
                "model": member.model.state_dict(),
                "configuration": member.configuration,
                "arch": member.arch,
            },
            buf,
        )
        weights = BundleLayout.member_weights(base)
        files[weights] = buf.getvalue()
        entries.append(
            {
                "configuration": member.configuration,
                "arch": member.arch,
                "fold": RunDir(run_dir).fold_name,
                "weights": weights,
                "plan": plan_name,
            }
        )
    assert first_plan is not None
    plan = Plan.from_dict(first_plan)
    files[BundleLayout.PREPROCESSING] = _dump(
        {
            c: {
                "spacing_zyx_mm": list(plan.configuration(c).spacing),
                "normalization": [asdict(n) for n in plan.configuration(c).normalization],
            }
            for c in dict.fromkeys(e["configuration"] for e in entries)
        }
    )
    if postprocessing is not None:
        files[BundleLayout.POSTPROCESSING] = (json.dumps(postprocessing, indent=2) + "\n").encode()
    if best is not None:
        files[BundleLayout.BEST] = best
    if training_range is not None:
        files[BundleLayout.TRAINING_RANGE] = training_range.to_json().encode()
    if model_card is not None:
        files[BundleLayout.MODEL_CARD] = model_card.encode()
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "medseg_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset_name": plan.dataset_name,
        "channel_names": list(plan.channel_names),
        "labels": {str(i): n for i, n in zip(plan.label_ids, plan.label_names)},
        "checkpoint": checkpoint,
        "members": entries,
        "postprocessing": BundleLayout.POSTPROCESSING if postprocessing is not None else None,
        "files": sorted(files),
    }
    _write_zip(output, {MANIFEST: _dump(manifest), **files})
    logger.info("wrote %s: %d network(s), %.1f MB", output, len(entries), output.stat().st_size / 1e6)
    return output


def _write_zip(path: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (name -> bytes) as a zip at ``path`` atomically; weights stored, JSON deflated."""

    def write(fh: BinaryIO) -> None:
        with zipfile.ZipFile(fh, "w") as zf:
            for name, data in files.items():
                kind = zipfile.ZIP_STORED if name.endswith(".pt") else zipfile.ZIP_DEFLATED
                zf.writestr(name, data, compress_type=kind)

    atomic_write_stream(path, write, ".zip")


def bundle_file_error(path: Path, name: str, problem: str) -> BundleError:
    """The error for a file ``name`` of the bundle ``path`` that has ``problem`` (e.g. ``"is missing"``)."""
    return BundleError(
        f"{path}: {name} in the bundle {problem}; export the bundle again with `medseg export WORK -o BUNDLE.zip`"
    )


@dataclass(frozen=True)
class BundledFile:
    """A file of a bundle as stored, for the caller to interpret (e.g. ``postprocessing.json``).

    Attributes:
        bundle: the bundle's path.
        name: the file's name in the zip.
        data: its bytes.
    """

    bundle: Path
    name: str
    data: bytes

    def error(self, problem: str) -> BundleError:
        """The error naming this file and the bundle, for a ``problem`` the caller found."""
        return bundle_file_error(self.bundle, self.name, problem)


class _Reader:
    """Reads members of an open bundle, turning every zip/JSON/torch problem into a :class:`BundleError`."""

    def __init__(self, path: Path, zf: zipfile.ZipFile) -> None:
        self.path, self.zf = path, zf
        self.names = set(zf.namelist())

    def error(self, name: str, problem: str) -> BundleError:
        return bundle_file_error(self.path, name, problem)

    def read(self, name: str) -> bytes:
        if name not in self.names:
            raise self.error(name, "is missing (incomplete bundle)")
        try:
            return self.zf.read(name)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
            raise self.error(name, f"is corrupt or truncated ({exc})") from None

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self.error(name, f"is not valid JSON ({exc})") from None

    def plan(self, name: str) -> Plan:
        try:
            return Plan.from_json(self.read(name).decode("utf-8", errors="replace"))
        except BundleError:
            raise
        except MedsegError as exc:
            raise self.error(name, f"is not a valid plan ({exc})") from None

    def weights(self, name: str) -> dict[str, Any]:
        data = self.read(name)
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt data, or a foreign object the weights-only unpickler refuses
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise self.error(name, f"cannot be loaded safely ({first})") from None
        if not isinstance(state, dict) or state.get("format") != WEIGHTS_FORMAT or "model" not in state:
            raise self.error(name, f"is not a medseg weights file (expected format {WEIGHTS_FORMAT!r})")
        return state


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a bundle, its format and version checked (see :func:`load_bundle` for the errors)."""
    path = Path(path)
    with _open(path) as zf:
        return _manifest(_Reader(path, zf))


def read_bundle_text(path: str | Path, name: str) -> str | None:
    """The text of the file ``name`` of a bundle (e.g. ``MODEL_CARD.md``), or None when the bundle lacks it.

    Raises:
        BundleError: not a readable bundle, or the file is corrupt.
    """
    path = Path(path)
    with _open(path) as zf:
        reader = _Reader(path, zf)
        _manifest(reader)
        return reader.read(name).decode("utf-8", errors="replace") if name in reader.names else None


def _open(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise BundleError(f"{path}: model bundle not found")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise BundleError(
            f"{path}: not a medseg model bundle, or the zip is truncated or corrupt ({exc}); "
            "export it again with `medseg export WORK -o BUNDLE.zip`"
        ) from None


def _manifest(reader: _Reader) -> dict[str, Any]:
    path = reader.path
    if MANIFEST not in reader.names:
        # a truncated bundle may still open: the zip reader then finds the directory of a stored model.pt
        raise BundleError(
            f"{path}: no {MANIFEST} found: the zip is truncated or corrupt, or not a medseg model "
            "bundle; export it again with `medseg export WORK -o BUNDLE.zip`"
        )
    manifest = reader.json(MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a medseg model bundle ({MANIFEST} format is not {BUNDLE_FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise reader.error(MANIFEST, f"has an invalid format_version {version!r}")
    if version > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {version} (written by medseg {manifest.get('medseg_version', '?')}) "
            f"is newer than this medseg {__version__} reads (up to {BUNDLE_FORMAT_VERSION}); upgrade medseg"
        )
    members = manifest.get("members")
    if (
        not isinstance(members, list)
        or not members
        or not all(
            isinstance(m, dict) and {"configuration", "arch", "fold", "weights", "plan"} <= set(m) for m in members
        )
    ):
        raise reader.error(MANIFEST, "lists no members, or members without configuration/arch/fold/weights/plan")
    missing = sorted(set(manifest.get("files", [])) - reader.names)
    if missing:
        raise reader.error(", ".join(missing), "is missing (incomplete bundle)")
    return manifest


def select_entries(
    manifest: dict[str, Any],
    configs: Sequence[str] | None,
    archs: Sequence[str] | None,
    folds: Sequence[int | str] | None,
    path: Path,
) -> list[dict[str, Any]]:
    """The manifest's member entries of the given configurations, architectures and folds (None: all).

    Raises:
        MedsegError: none matches (the message lists what the bundle holds).
    """
    wanted_folds = None if folds is None else {fold_name(f) for f in folds}
    chosen = [
        m
        for m in manifest["members"]
        if (configs is None or m["configuration"] in configs)
        and (archs is None or m["arch"] in archs)
        and (wanted_folds is None or m["fold"] in wanted_folds)
    ]
    if not chosen:
        have = [f"{m['configuration']}/{m['arch']}/{m['fold']}" for m in manifest["members"]]
        raise MedsegError(f"{path}: no network of the bundle matches the selection; it holds {have}")
    return chosen


def load_bundle(
    path: str | Path,
    configs: Sequence[str] | None = None,
    archs: Sequence[str] | None = None,
    folds: Sequence[int | str] | None = None,
    postprocessing: bool = True,
) -> tuple[list[EnsembleMember], BundledFile | None]:
    """The ensemble members of a bundle, and its postprocessing rules file as stored.

    Args:
        path: the zip written by :func:`write_bundle`.
        configs / archs / folds: keep only these members (None: all); ``folds`` as ``[0, 1]`` or ``["all"]``.
        postprocessing: also read the bundle's ``postprocessing.json`` (the caller checks and applies it,
            see :func:`medseg.ensembling.selection.bundle_ensemble`).

    Returns:
        ``(members, postprocessing.json or None)``; models on the CPU in eval mode; None when the bundle
        carries no rules or ``postprocessing`` is False.

    Raises:
        BundleError: the bundle is missing, not a zip, truncated or corrupt, misses a file, is of a newer
            format version, or holds weights that do not fit their plan.
        MedsegError: the selection keeps no member.
    """
    path = Path(path)
    with _open(path) as zf:
        reader = _Reader(path, zf)
        manifest = _manifest(reader)
        chosen = select_entries(manifest, configs, archs, folds, path)
        plans: dict[str, Plan] = {}
        members = []
        for m in chosen:
            if m["plan"] not in plans:
                plans[m["plan"]] = reader.plan(m["plan"])
            plan = plans[m["plan"]]
            state = reader.weights(m["weights"])
            try:
                stage = Stage.resolve(plan, m["configuration"], m["arch"])
                model = stage.network.build(plan.num_channels, plan.num_classes)
                model.load_state_dict(state["model"])
            except (MedsegError, RuntimeError) as exc:
                first = str(exc).splitlines()[0]
                raise reader.error(
                    m["weights"], f"does not fit the {m['arch']} network of its plan ({first})"
                ) from None
            model.eval()
            members.append(EnsembleMember.of_stage(model, stage, source=f"{path}:{m['weights']}"))
        rules = None
        if postprocessing and manifest.get("postprocessing"):
            name = manifest["postprocessing"]
            rules = BundledFile(path, name, reader.read(name))
    logger.info("bundle %s (medseg %s): %d network(s)", path, manifest.get("medseg_version", "?"), len(members))
    return members, rules
