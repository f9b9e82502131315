"""Fine-tuning a MONAI-backed architecture from MONAI's own weights through the real CLI: a SegResNetDS and a
DynUNet built with MONAI's classes on the plan's topology but another class / channel count, saved as a plain
state dict and as ``{"state_dict": ...}`` (MONAI bundles, Auto3DSeg); ``medseg train --pretrained`` loads every
tensor whose shape matches (the network's weights equal the file's before training) and re-initialises the
heads / the first layer, listed in one log line; a file of another width exits 2 with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.networks.nets import DynUNet, SegResNetDS

import medseg.training.run as run_module
from medseg.cli.main import main
from medseg.networks.monai_nets import MonaiNetwork, monai_norm, segresnet_resolution
from tests.helpers import TINY_TRAIN, shrink_networks

pytestmark = pytest.mark.slow
PREFIX = MonaiNetwork.MODULE_PREFIX


def _spec(work: Path, arch: str) -> dict:
    return json.loads((work / "plans.json").read_text())["configurations"]["3d_fullres"]["networks"][arch]["spec"]


def _segresnet(spec: dict, in_channels: int, classes: int, init_filters: int | None = None) -> SegResNetDS:
    """MONAI's SegResNetDS with the plan's topology (as Auto3DSeg builds it), ``classes`` outputs."""
    n = len(spec["strides"])
    return SegResNetDS(
        spatial_dims=3,
        init_filters=init_filters or spec["base_features"],
        in_channels=in_channels,
        out_channels=classes,
        norm=monai_norm(spec["norm"], spec["base_features"]),
        blocks_down=(1, 2, 2, 4, 4, 4, 4, 4)[:n],
        dsdepth=max(1, n - 1),
        resolution=segresnet_resolution(spec["strides"]),
    )


def _dynunet(spec: dict, in_channels: int, classes: int) -> DynUNet:
    """MONAI's DynUNet with the plan's kernels, strides and features (deep supervision on)."""
    n = len(spec["strides"])
    features = [min(spec["base_features"] * 2**i, spec["max_features"]) for i in range(n)]
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=classes,
        kernel_size=spec["kernel_sizes"],
        strides=spec["strides"],
        upsample_kernel_size=spec["strides"][1:],
        filters=features,
        norm_name=monai_norm(spec["norm"], spec["base_features"]),
        deep_supervision=True,
        deep_supr_num=n - 2,
    )


def _train_capturing(work: Path, arch: str, pretrained: Path, monkeypatch) -> tuple[dict, dict[str, torch.Tensor]]:
    """Train ``arch`` from ``pretrained``; the run's pretrained report and the network's weights right after loading."""
    loaded: dict[str, torch.Tensor] = {}

    def load_and_keep(model, source, stage):
        report = real(model, source, stage)
        loaded.update({n: t.detach().clone() for n, t in model.state_dict().items()})
        return report

    real = run_module.load_pretrained
    monkeypatch.setattr(run_module, "load_pretrained", load_and_keep)
    args = ["train", str(work), "--fold", "0", "--arch", arch, *TINY_TRAIN, "--no-validation"]
    assert main([*args, "--pretrained", str(pretrained)]) == 0
    monkeypatch.setattr(run_module, "load_pretrained", real)
    run = work / "runs" / "3d_fullres" / arch / "fold_0"
    return json.loads((run / "run_record.json").read_text())["pretrained_report"], loaded


def _check_transfer(report: dict, loaded: dict[str, torch.Tensor], file_state: dict[str, torch.Tensor]) -> list[str]:
    """Every tensor of the file whose shape fits is in the network as it was saved; the others are exactly the
    skipped ones. Returns the skipped names."""
    fits = [
        n for n, t in loaded.items() if n[len(PREFIX) :] in file_state and file_state[n[len(PREFIX) :]].shape == t.shape
    ]
    assert fits and len(fits) == report["loaded"] and report["tensors"] == len(loaded)
    for name in fits:
        assert torch.equal(loaded[name], file_state[name[len(PREFIX) :]]), name
    assert sorted(report["skipped"]) == sorted(n for n in loaded if n not in fits)
    return report["skipped"]


def test_fine_tune_segresnet_and_dynunet_from_monai_state_dicts(tmp_path, synthetic_dataset, monkeypatch, capsys):
    work = tmp_path / "work"
    plan_args = ["plan", str(synthetic_dataset), "-o", str(work), "--num-workers", "1", "--device", "cpu"]
    assert main([*plan_args, "--configs", "3d_fullres", "--archs", "segresnet", "dynunet"]) == 0
    shrink_networks(work)
    plan = json.loads((work / "plans.json").read_text())
    channels, classes = len(plan["channel_names"]), len(plan["label_names"])

    # a plain state dict of a SegResNetDS trained for 2 classes: everything but the output heads carries over
    torch.manual_seed(1)
    segresnet = _segresnet(_spec(work, "segresnet"), channels, 2)
    raw = {n: t.clone() for n, t in segresnet.state_dict().items()}
    torch.save(raw, tmp_path / "segresnet.pt")
    report, loaded = _train_capturing(work, "segresnet", tmp_path / "segresnet.pt", monkeypatch)
    skipped = _check_transfer(report, loaded, raw)
    assert skipped and all(".head." in n for n in skipped), skipped  # the deep-supervision heads, weight and bias
    assert all(report["mismatched_shapes"][n][0].startswith("2") for n in skipped)
    assert all(report["mismatched_shapes"][n][1].startswith(str(classes)) for n in skipped)
    assert report["member"] == f"plain state dict of {len(raw)} tensors: the whole file"
    log = (work / "runs/3d_fullres/segresnet/fold_0/training_log.txt").read_text()
    line = next(ln for ln in log.splitlines() if "keep their fresh initialisation" in ln)
    assert all(f"{n} ({report['mismatched_shapes'][n][0]} pretrained, " in line for n in skipped), line

    # DynUNet as a MONAI bundle / Auto3DSeg saves it, for 2 input channels: only the first layer starts fresh
    torch.manual_seed(2)
    dynunet = _dynunet(_spec(work, "dynunet"), channels + 1, classes)
    raw = {n: t.clone() for n, t in dynunet.state_dict().items()}
    torch.save({"state_dict": raw, "epoch": 300, "best_metric": 0.9}, tmp_path / "dynunet.pth")
    report, loaded = _train_capturing(work, "dynunet", tmp_path / "dynunet.pth", monkeypatch)
    skipped = _check_transfer(report, loaded, raw)
    # DynUNet registers its input block twice (also as skip_layers.downsample): both names are the first conv
    first = f"{PREFIX}input_block.conv1.conv.weight"
    assert first in skipped and all(torch.equal(loaded[n], loaded[first]) for n in skipped), skipped
    file_shape, here = report["mismatched_shapes"][first]
    assert file_shape.split("x")[1] == str(channels + 1) and here.split("x")[1] == str(channels)
    assert report["member"].endswith(": its 'state_dict' entry")

    # a SegResNetDS of another width matches nothing: one line naming the file, exit 2
    wide = _segresnet(
        _spec(work, "segresnet"), channels, classes, init_filters=2 * _spec(work, "segresnet")["base_features"]
    )
    torch.save({"model": wide.state_dict()}, tmp_path / "wide.pt")
    capsys.readouterr()
    args = ["train", str(work), "--fold", "1", "--arch", "segresnet", *TINY_TRAIN]
    assert main([*args, "--pretrained", str(tmp_path / "wide.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert f"{tmp_path / 'wide.pt'}: " in err and "different architecture/width" in err, err
    assert not (work / "runs/3d_fullres/segresnet/fold_1/checkpoint_final.pt").exists()
