"""Training data: preprocessed cases in memory (or memory-mapped), random patches, background loading.

Batch ``i`` of a run is a pure function of ``(seed, i)``: every sample ``j`` of the (global) batch draws
its case, position and augmentation from its own generator seeded with ``(seed, i, j)``. Hence

* resuming at iteration ``i`` continues with exactly the batches an uninterrupted run would see,
* background workers can produce batches in any order, and
* under ``torchrun`` each rank computes only its slice ``j in [lo, hi)`` of the global batch, and
  together the ranks see the same samples one process would (DDP equals single-process training).

Foreground oversampling: the last ``ceil(foreground_oversample * B)`` samples of every batch are centred
on a foreground voxel. Their class is drawn uniformly among the foreground classes present in the
training cases, then a case containing it, then one of its sampled voxel locations
(``CaseProperties.class_locations``), so rare classes are seen as often as frequent ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from medseg.errors import MedsegError
from medseg.planning.stage import Stage
from medseg.preprocessing import preprocessed_folder
from medseg.progress import progress_bar
from medseg.training.augmentation import SpatialParams, draw_spatial, extract_patch, perturb_previous_stage
from medseg.training.config import AugmentationConfig, TrainConfig
from medseg.training.intensity_augmentation import apply_intensity, draw_intensity
from medseg.training.previous_stage import load_network_input

logger = logging.getLogger(__name__)

#: Cases are kept in memory when their uncompressed arrays total less than this many GB (and less
#: than 40 % of the available memory); otherwise they are unpacked once to ``.npy`` and memory-mapped.
IN_MEMORY_LIMIT_GB = 6.0


@dataclass
class CaseData:
    """One preprocessed training case.

    Attributes:
        case_id: identifier.
        data: float32 ``(C, Z, Y, X)`` (array or read-only memory map).
        seg: class indices ``(Z, Y, X)``.
        locations: foreground class -> int ``(N, 3)`` sampled voxel coordinates ``(z, y, x)``.
    """

    case_id: str
    data: np.ndarray
    seg: np.ndarray
    locations: dict[int, np.ndarray]


def _uncompressed_bytes(npz: Path) -> int:
    try:
        with zipfile.ZipFile(npz) as zf:
            return sum(i.file_size for i in zf.infolist() if i.filename in ("data.npy", "seg.npy"))
    except (OSError, zipfile.BadZipFile):
        return 0


def _available_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 1024**3


def _locations_to_arrays(class_locations: dict[int, list[list[int]]]) -> dict[int, np.ndarray]:
    out = {}
    for k, locs in class_locations.items():
        if int(k) == 0 or not locs:
            continue
        out[int(k)] = np.asarray(locs, dtype=np.int32).reshape(-1, 3)
    return out


def _unpacked(folder: Path, case_id: str, data: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Write ``data``/``seg`` as ``.npy`` under ``folder`` (atomically) and return memory maps of them."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, arr in (("data", data), ("seg", seg)):
        path = folder / f"{case_id}_{name}.npy"
        if path.is_file():
            try:
                existing = np.load(path, mmap_mode="r")
                if existing.shape == arr.shape and existing.dtype == arr.dtype and np.array_equal(existing, arr):
                    out.append(existing)
                    continue
            except (OSError, ValueError):
                pass
        tmp = folder / f".tmp_{case_id}_{name}.npy"
        np.save(tmp, arr)
        os.replace(tmp, path)
        out.append(np.load(path, mmap_mode="r"))
    return out[0], out[1]


def load_training_cases(
    work_dir: str | Path, stage: Stage, case_ids: Sequence[str], progress: bool = True
) -> list[CaseData]:
    """Read the preprocessed cases ``case_ids`` of the stage's configuration (a cascade's ``data`` holds the one-hot
    previous-stage channels after the image channels, :func:`medseg.training.previous_stage.load_network_input`).

    Small datasets are held in memory; datasets whose uncompressed arrays exceed
    :data:`IN_MEMORY_LIMIT_GB` (or 40 % of the free memory) are unpacked once to
    ``WORK/preprocessed/<folder>/unpacked/`` and memory-mapped.

    Raises:
        MedsegError: a case is missing, unreadable or stale (from ``load_case``), or has no label.
    """
    plan, configuration = stage.plan, stage.config_name
    folder = preprocessed_folder(work_dir, plan, configuration)
    total = sum(_uncompressed_bytes(folder / f"{c}.npz") for c in case_ids)
    limit = min(IN_MEMORY_LIMIT_GB * 1024**3, 0.4 * _available_memory_bytes())
    in_memory = total <= limit
    if not in_memory:
        logger.info(
            "training data: %.1f GB uncompressed > %.1f GB; memory-mapping unpacked copies in %s",
            total / 1024**3,
            limit / 1024**3,
            folder / "unpacked",
        )
    cases = []
    for cid in progress_bar(case_ids, desc="loading cases", unit="case", disable=not progress or len(case_ids) < 20):
        data, seg, props = load_network_input(work_dir, plan, configuration, cid)  # + a cascade's previous stage
        if seg is None:
            raise MedsegError(
                f"{folder / (cid + '.npz')}: preprocessed case {cid!r} has no segmentation; cannot train on it"
            )
        if not in_memory:
            data, seg = _unpacked(folder / "unpacked", cid, data, seg)
        cases.append(CaseData(cid, data, seg, _locations_to_arrays(props.class_locations)))
    return cases


def num_foreground_samples(batch_size: int, fraction: float) -> int:
    """How many samples of a batch of ``batch_size`` are forced to contain foreground.

    ``ceil(fraction * batch_size)`` (at least the requested fraction). A batch of one sample is forced
    with probability ``fraction`` instead (see :meth:`PatchSampler.batch`); this returns 0 for it.
    """
    if fraction <= 0 or batch_size < 2:
        return 0
    return min(batch_size, int(math.ceil(fraction * batch_size - 1e-9)))


class PatchSampler:
    """Draws (augmented) training patches from cases; see the module docstring for the rules.

    Args:
        cases: the cases to sample from.
        patch_size: ``(Z, Y, X)`` for 3D or ``(Y, X)`` for 2D networks (then a Z slice is sampled).
        batch_size: global batch size ``B``.
        foreground_oversample: fraction of each batch centred on foreground.
        augmentation: settings, or None for plain patches (validation).
        seed: base seed.
        anisotropic: 3D data with a much coarser Z spacing (rotate in-plane only).
        image_channels: leading channels that intensity augmentation changes (None = all); a cascade's
            one-hot previous-stage channels after them only move with the spatial augmentation.
    """

    def __init__(
        self,
        cases: Sequence[CaseData],
        patch_size: Sequence[int],
        batch_size: int,
        foreground_oversample: float = 0.33,
        augmentation: AugmentationConfig | None = None,
        seed: int = 0,
        anisotropic: bool = False,
        image_channels: int | None = None,
    ) -> None:
        if not cases:
            raise ValueError("no cases to sample patches from")
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.dims = len(self.patch_size)
        self.batch_size = int(batch_size)
        self.foreground_oversample = float(foreground_oversample)
        self.augmentation = augmentation if augmentation is not None and augmentation.enabled else None
        self.seed = int(seed)
        self.anisotropic = anisotropic
        self.image_channels = image_channels
        self.num_forced = num_foreground_samples(self.batch_size, self.foreground_oversample)
        by_class: dict[int, list[int]] = {}
        for i, c in enumerate(self.cases):
            for k, locs in c.locations.items():
                if len(locs):
                    by_class.setdefault(k, []).append(i)
        self.cases_by_class = {k: np.asarray(v) for k, v in sorted(by_class.items())}
        self.foreground_classes = list(self.cases_by_class)

    def _valid_center_range(self, spatial: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        # centres for which the (unaugmented) patch lies inside the image; where the image is smaller
        # than the patch, centres for which the image lies inside the patch
        half = np.array([(p - 1) / 2 for p in self.patch_size])
        s = np.asarray(spatial, dtype=np.float64)
        a, b = half, s - 1 - half
        return np.minimum(a, b), np.maximum(a, b)

    def _choose(self, rng: np.random.Generator, forced: bool) -> tuple[CaseData, np.ndarray, int | None]:
        """Case, patch centre (``dims`` floats) and, for 2D, the Z slice of one sample."""
        if forced and self.foreground_classes:
            k = self.foreground_classes[int(rng.integers(len(self.foreground_classes)))]
            candidates = self.cases_by_class[k]
            case = self.cases[int(candidates[int(rng.integers(len(candidates)))])]
            locs = case.locations[k]
            voxel = locs[int(rng.integers(len(locs)))].astype(np.float64)
            if self.dims == 2:
                z, point = int(voxel[0]), voxel[1:]
            else:
                z, point = None, voxel
            spatial = case.seg.shape[-self.dims :]
            lo, hi = self._valid_center_range(spatial)
            return case, np.clip(point, lo, hi), z
        case = self.cases[int(rng.integers(len(self.cases)))]
        z = int(rng.integers(case.seg.shape[0])) if self.dims == 2 else None
        lo, hi = self._valid_center_range(case.seg.shape[-self.dims :])
        return case, rng.uniform(lo, hi), z

    def sample_rng(self, iteration: int, index: int) -> np.random.Generator:
        """The generator of sample ``index`` of batch ``iteration``."""
        return np.random.default_rng([self.seed, int(iteration), int(index)])

    def batch(self, iteration: int, lo: int = 0, hi: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``lo..hi-1`` of global batch ``iteration``.

        Returns:
            ``(images (b, C, *patch) float32, labels (b, *patch) small integer type - int8 for up to
            127 classes; convert with ``.long()`` for the loss)`` with ``b = hi - lo``.
        """
        hi = self.batch_size if hi is None else hi
        images, labels, rngs = [], [], []
        for j in range(lo, hi):
            rng = self.sample_rng(iteration, j)
            if self.batch_size == 1:
                forced = rng.random() < self.foreground_oversample
            else:
                forced = j >= self.batch_size - self.num_forced
            case, center, z = self._choose(rng, forced)
            params = draw_spatial(rng, center, self.augmentation, self.dims, self.anisotropic)
            if z is None:
                img, lab = extract_patch(case.data, case.seg, params, self.patch_size)
            else:
                img, lab = extract_patch(case.data[:, z], case.seg[z], params, self.patch_size)
            assert lab is not None  # extract_patch crops a label whenever it is given one
            images.append(img)
            labels.append(lab)
            rngs.append(rng)
        x = torch.stack(images)
        y = torch.stack(labels)
        if (
            self.augmentation is not None
            and self.augmentation.previous_stage_perturbation
            and self.image_channels is not None
            and x.shape[1] > self.image_channels
        ):
            for i, rng in enumerate(rngs):  # a cascade's previous-stage channels
                perturb_previous_stage(x[i, self.image_channels :], rng)
        apply_intensity(x[:, : self.image_channels], draw_intensity(rngs, self.augmentation, self.dims))
        return x, y


class _BatchStream(IterableDataset):
    """Endless stream of batches ``start, start + 1, ...`` split round-robin over the loader's workers."""

    def __init__(self, sampler: PatchSampler, start: int, lo: int, hi: int) -> None:
        super().__init__()
        self.sampler, self.start, self.lo, self.hi = sampler, start, lo, hi

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, n = (info.id, info.num_workers) if info is not None else (0, 1)
        it = self.start + worker
        while True:
            yield self.sampler.batch(it, self.lo, self.hi)
            it += n


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch operations in the calling thread only (batch preparation: small operations gain nothing
    from more threads, and synchronising them costs much when cores are shared)."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


class _InlineBatches:
    """Batches made in the calling thread on request, single-threaded."""

    def __init__(self, stream: _BatchStream) -> None:
        self._it = iter(stream)

    def __iter__(self) -> _InlineBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        with single_threaded():
            return next(self._it)


def batch_iterator(
    sampler: PatchSampler, start: int, lo: int = 0, hi: int | None = None, num_workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``start, start + 1, ...`` (rank slice ``lo..hi``), produced by ``num_workers`` processes.

    With ``num_workers == 0`` batches are made in the calling thread when requested (single-threaded).
    Workers are forked, so in-memory cases are shared, not copied; each uses one thread.
    """
    hi = sampler.batch_size if hi is None else hi
    stream = _BatchStream(sampler, start, lo, hi)
    if num_workers <= 0:
        return _InlineBatches(stream)
    ctx = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        worker_init_fn=_init_worker,
        prefetch_factor=2,
        persistent_workers=False,
        multiprocessing_context=ctx,
    )
    return iter(loader)


__all__ = [
    "CaseData",
    "PatchSampler",
    "SpatialParams",
    "batch_iterator",
    "load_training_cases",
    "num_foreground_samples",
]


def make_samplers(
    train_cases: list[CaseData],
    val_cases: list[CaseData],
    stage: Stage,
    cfg: TrainConfig,
    mirror_axes: tuple[int, ...],
    anisotropic: bool,
) -> tuple[PatchSampler, PatchSampler]:
    """The run's training sampler (augmented, mirroring ``mirror_axes``) and its pseudo-Dice sampler (no
    augmentation; the held-out cases, or the training cases when there are none), both at the stage's patch and
    batch size."""
    augmentation = dataclasses.replace(cfg.augmentation, mirror_axes=mirror_axes)
    sampler = PatchSampler(
        train_cases,
        stage.patch_size,
        stage.batch_size,
        cfg.foreground_oversample,
        augmentation,
        seed=cfg.seed,
        anisotropic=anisotropic,
        image_channels=stage.plan.num_channels,
    )
    val_sampler = PatchSampler(
        val_cases or train_cases,
        stage.patch_size,
        stage.batch_size,
        cfg.foreground_oversample,
        None,
        seed=cfg.seed + 1,
        anisotropic=anisotropic,
    )
    return sampler, val_sampler
