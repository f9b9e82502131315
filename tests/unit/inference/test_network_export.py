"""ONNX / TorchScript export: every architecture x 2D/3D reproduces PyTorch's logits (onnxruntime,
torch.jit.load) with a dynamic batch axis; inference.json records what prediction does around the network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medseg.ensembling.bundle_export import export_bundle, export_networks
from medseg.inference.members import load_member
from medseg.inference.network_export import run_exported
from medseg.io.checkpoint import save_checkpoint
from medseg.networks.layers import _adaptive_avg_pool_matmul
from medseg.planning.plan import ConfigurationPlan, NormalizationSpec, Plan
from tests.helpers import network_plan

ARCHS = ("unet", "deeplab", "psp", "fcn")
# anisotropic topologies: PSP's pyramid bins (1, 2, 3, 6) do not divide the 4x6 / 1x4x3 bottlenecks
TOPOLOGY = {
    3: dict(
        patch_size=(8, 32, 24),
        strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
        kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
    ),
    2: dict(
        patch_size=(16, 48), strides=((1, 1), (1, 2), (2, 2), (2, 2)), kernel_sizes=((1, 3), (3, 3), (3, 3), (3, 3))
    ),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _work(tmp_path, arch, dims, channels=2):
    net = network_plan(arch=arch, batch_size=2, base_features=4, max_features=16, **TOPOLOGY[dims])
    name = "3d_fullres" if dims == 3 else "2d"
    cfg = ConfigurationPlan(
        name=name,
        dims=dims,
        spacing=(3.0, 0.8, 1.2),
        median_shape=(10, 40, 30),
        networks={arch: net},
        default_arch=arch,
        normalization=(NormalizationSpec("ct", False, -100.0, 300.0, 40.0, 80.0), NormalizationSpec("zscore", True)),
        mirror_axes=(dims - 1,),
    )
    plan = Plan(
        dataset_name="t",
        channel_names=("CT", "PET")[:channels],
        label_ids=(0, 1, 4),
        label_names=("background", "liver", "tumour"),
        original_median_spacing=(3.0, 0.8, 1.2),
        original_median_shape=(10, 40, 30),
        configurations={name: cfg},
        default_configuration=name,
    ).validate()
    work = tmp_path / f"work_{arch}_{dims}d"
    work.mkdir()
    plan.save(work / "plans.json")
    torch.manual_seed(0)
    model = net.build(channels, 3)
    save_checkpoint(
        {
            "model": model.state_dict(),
            "epoch": 1,
            "iteration": 1,
            "train_config": {},
            "plan": plan.to_dict(),
            "configuration": name,
            "arch": arch,
        },
        work / "runs" / name / arch / "fold_0" / "checkpoint_final.pt",
    )
    return work, name


@pytest.mark.parametrize("dims", [3, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_exports_with_matching_logits(tmp_path, arch, dims):
    import onnxruntime  # noqa: F401 - the dev extra installs it (and onnx): missing means a broken install

    work, name = _work(tmp_path, arch, dims)
    member = load_member(work / "runs" / name / arch / "fold_0")
    x = torch.randn(3, 2, *TOPOLOGY[dims]["patch_size"])  # another batch size than the export's
    with torch.no_grad():
        ref = member.model(x).numpy()
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".torchscript.pt")):
        out = tmp_path / fmt
        info = json.loads(export_networks(work, out, fmt).read_text())
        file = out / name / arch / f"fold_0{suffix}"
        assert info["networks"][0]["file"] == f"{name}/{arch}/fold_0{suffix}"
        got = run_exported(file.read_bytes(), fmt, x.numpy())
        assert got.shape == ref.shape == (3, 3, *TOPOLOGY[dims]["patch_size"])
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"{arch} {dims}D {fmt}")
    loaded = torch.jit.load(str(file))  # the TorchScript file on its own, as a user loads it
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), ref, atol=1e-5, rtol=0)


def test_inference_json_describes_the_prediction(tmp_path):
    work, _ = _work(tmp_path, "unet", 3)
    rules = {
        "format": "medseg-postprocessing-v1",
        "per_label": {"1": [{"op": "largest_component"}]},
        "fitted_on": {"members": [["3d_fullres", "unet"]]},
    }
    (work / "postprocessing.json").write_text(json.dumps(rules))
    bundle = export_bundle(work, tmp_path / "m.zip")
    from_work = json.loads(export_networks(work, tmp_path / "a", "torchscript").read_text())
    from_zip = json.loads(export_networks(bundle, tmp_path / "b", "torchscript").read_text())
    assert from_work == from_zip  # a bundle exports the same networks and settings
    net = from_work["networks"][0]
    assert net["patch_size"] == [8, 32, 24] and net["spacing_zyx_mm"] == [3.0, 0.8, 1.2]
    assert net["mirror_axes"] == [2] and len(net["shift_variants"]) == 2  # 2 flips x 2 shifts
    assert net["normalization"][0] == {
        "channel": "CT",
        "scheme": "ct",
        "use_nonzero_mask": False,
        "clip_low": -100.0,
        "clip_high": 300.0,
        "mean": 40.0,
        "std": 80.0,
    }
    assert net["normalization"][1]["scheme"] == "zscore" and net["normalization"][1]["use_nonzero_mask"]
    assert from_work["label_ids"] == [0, 1, 4] and from_work["label_names"] == ["background", "liver", "tumour"]
    assert from_work["sliding_window"]["step"] == 0.5 and from_work["sliding_window"]["gaussian_sigma_scale"] == 0.125
    assert from_work["postprocessing"]["per_label"] == rules["per_label"]


def test_matmul_pooling_equals_adaptive_pooling():
    x = torch.randn(2, 3, 5, 7, 4)
    for size in [(1, 1, 1), (2, 3, 3), (5, 6, 4), (3, 7, 1)]:
        torch.testing.assert_close(_adaptive_avg_pool_matmul(x, size), torch.nn.functional.adaptive_avg_pool3d(x, size))
    torch.testing.assert_close(
        _adaptive_avg_pool_matmul(x[:, :, 0], (3, 2)), torch.nn.functional.adaptive_avg_pool2d(x[:, :, 0], (3, 2))
    )


def test_unknown_format_is_refused(tmp_path):
    from medseg.errors import ConfigError

    work, _ = _work(tmp_path, "fcn", 2)
    with pytest.raises(ConfigError, match="bundle.*onnx.*torchscript"):
        export_networks(work, tmp_path / "x", "tflite")
