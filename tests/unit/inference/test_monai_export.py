"""ONNX / TorchScript export of MONAI's networks through ``export_networks``: segresnet, dynunet (2D and 3D) and
swinunetr (3D) all trace, and the exported files reproduce PyTorch's logits at another batch size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.ensembling.bundle_export import export_networks
from medseg.inference.members import load_member
from medseg.inference.network_export import run_exported
from medseg.networks import NetworkSpec, accepted_spec
from medseg.planning.plan import NetworkPlan

from . import test_network_export as exports
from .test_network_export import _one_thread, _work  # noqa: F401  (autouse fixture)

SWIN_PATCH = (32, 32, 64)


def _swin_plan(**_: object) -> NetworkPlan:
    spec = accepted_spec(NetworkSpec("swinunetr", ((3, 3, 3),), ((1, 1, 1),), base_features=12))
    return NetworkPlan(spec, patch_size=SWIN_PATCH, batch_size=2)


def _exports_match(tmp_path, arch: str, dims: int, patch: tuple[int, ...]) -> None:
    import onnxruntime  # noqa: F401 - the dev extra installs it (and onnx): missing means a broken install

    work, name = _work(tmp_path, arch, dims)
    member = load_member(work / "runs" / name / arch / "fold_0")
    x = torch.randn(3, 2, *patch)  # another batch size than the export's
    with torch.no_grad():
        ref = member.model(x).numpy()
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".torchscript.pt")):
        export_networks(work, tmp_path / fmt, fmt)
        got = run_exported((tmp_path / fmt / name / arch / f"fold_0{suffix}").read_bytes(), fmt, x.numpy())
        assert got.shape == ref.shape == (3, 3, *patch)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"{arch} {dims}D {fmt}")


@pytest.mark.parametrize("dims", [3, 2])
@pytest.mark.parametrize("arch", ["segresnet", "dynunet"])
def test_segresnet_and_dynunet_export_with_matching_logits(tmp_path, arch, dims):
    _exports_match(tmp_path, arch, dims, exports.TOPOLOGY[dims]["patch_size"])


@pytest.mark.slow  # about a minute on one thread: tracing SwinUNETR to ONNX alone takes ~15 s
def test_swinunetr_exports_with_matching_logits(tmp_path, monkeypatch):
    monkeypatch.setattr(exports, "network_plan", _swin_plan)
    _exports_match(tmp_path, "swinunetr", 3, SWIN_PATCH)
