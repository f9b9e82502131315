"""Fine-tuning from pretrained weights: matching by name and shape on tiny networks (same network, other
classes, other channels, another width), reading bundles and checkpoints, and train(pretrained=...)
(config.json record, no refit under a budget, no reload on resume)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from medseg.ensembling.bundle_export import export_bundle
from medseg.errors import MedsegError
from medseg.planning.plan import Plan
from medseg.planning.stage import Stage
from medseg.training import TrainConfig, load_checkpoint, train
from medseg.training.budget_refit import fit_run_to_budget
from medseg.training.pretrained import check_match, load_pretrained, match_weights, read_pretrained
from medseg.training.run_record import RunRecord
from tests.helpers import network_plan

FAST = dict(
    iters_per_epoch=2, val_iters=1, num_workers=0, num_threads=1, precision="fp32", seed=3, final_validation=False
)
ANISO3 = dict(
    patch_size=(8, 32, 24),
    strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
    kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
)


def _net(arch: str = "unet", channels: int = 1, classes: int = 3, **overrides) -> torch.nn.Module:
    torch.manual_seed(len(overrides) + 7 * channels + 13 * classes)
    plan = network_plan(
        **{"arch": arch, "batch_size": 2, "base_features": 4, "max_features": 16, **ANISO3, **overrides}
    )
    return plan.build(channels, classes)


def test_the_same_network_loads_every_tensor():
    new, old = _net(), _net(classes=3, deep_supervision=True)
    match = match_weights(new.state_dict(), old.state_dict())
    assert match.total == len(new.state_dict()) and len(match.loaded) == match.total
    assert match.skipped == [] and match.unused == () and match.fraction == 1.0


def test_other_classes_skip_every_output_head_deep_supervision_included():
    old, new = _net(classes=4), _net(classes=2)
    heads = [n for n in new.state_dict() if n.startswith("heads.")]
    assert len(heads) >= 4  # full resolution + deep-supervision heads, weight and bias each
    match = match_weights(new.state_dict(), old.state_dict())
    assert match.skipped == heads and set(match.mismatched) == set(heads)
    assert len(match.loaded) == match.total - len(heads) and 0.9 < match.fraction < 1.0


@pytest.mark.parametrize("arch", ["unet", "deeplab", "psp", "fcn"])
def test_other_classes_skip_only_class_sized_tensors(arch):
    old, new = _net(arch, classes=5), _net(arch, classes=2)
    match = match_weights(new.state_dict(), old.state_dict())
    assert match.loaded and match.skipped
    assert all(new.state_dict()[n].shape[0] == 2 for n in match.skipped), match.skipped


def test_other_input_channels_skip_the_first_convolution_only():
    old, new = _net(channels=1), _net(channels=4)
    match = match_weights(new.state_dict(), old.state_dict())
    first = next(iter(new.state_dict()))
    assert match.skipped == [first] == ["encoder.0.0.conv.weight"]
    assert match.mismatched[first] == ((4, 1, 1, 3, 3), (4, 4, 1, 3, 3))


def test_load_copies_the_matching_tensors_and_keeps_the_fresh_heads(tiny_work):
    plan = Plan.load(tiny_work / "plans.json")
    old, new = _net(classes=4), _net(classes=2)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    source = _source(tiny_work, old)
    report = load_pretrained(new, source, Stage.resolve(plan, "3d_fullres", "unet"))
    state = new.state_dict()
    for name in report["skipped"]:
        assert torch.equal(state[name], fresh[name]), name
    loaded = [n for n in state if n not in report["skipped"]]
    assert loaded and all(torch.equal(state[n], old.state_dict()[n]) for n in loaded)
    assert report["loaded"] == len(loaded) and report["tensors"] == len(state)
    assert report["mismatched_shapes"]["heads.0.weight"] == ["4x4x1x1x1", "2x4x1x1x1"]


def test_a_network_of_another_width_is_refused(tiny_work):
    plan = Plan.load(tiny_work / "plans.json")
    old, new = _net(base_features=8, max_features=32), _net()
    match = match_weights(new.state_dict(), old.state_dict())
    # the heads' biases match whenever the classes do: alone they are no reason to fine-tune
    assert match.loaded == ("heads.0.bias", "heads.1.bias") and match.loaded_kernels == 0
    with pytest.raises(
        MedsegError,
        match=rf"2 of {match.total} tensors match, none of them a convolution or "
        r"linear weight: the pretrained network is a different architecture/width",
    ):
        check_match(match, _source(tiny_work, old), Stage.resolve(plan, "3d_fullres", "unet"))
    other = _net(base_features=8, max_features=32, classes=2)
    match = match_weights(new.state_dict(), other.state_dict())
    assert match.loaded == ()
    with pytest.raises(
        MedsegError,
        match=rf"0 of {match.total} tensors match: the pretrained network is a "
        r"different architecture/width \(checkpoint of 3d_fullres/unet",
    ):
        check_match(match, _source(tiny_work, other), Stage.resolve(plan, "3d_fullres", "unet"))


def _source(work, model):
    """A PretrainedSource read from a checkpoint holding ``model``'s weights."""
    from medseg.io.checkpoint import save_checkpoint

    path = work / "source.pt"
    save_checkpoint(
        {
            "model": model.state_dict(),
            "epoch": 1,
            "iteration": 2,
            "train_config": {"fold": 0},
            "plan": Plan.load(work / "plans.json").to_dict(),
            "configuration": "3d_fullres",
            "arch": "unet",
        },
        path,
    )
    return read_pretrained(path, "3d_fullres", "unet")


def test_unreadable_sources_are_refused_in_one_line(tmp_path):
    with pytest.raises(MedsegError, match="pretrained weights not found"):
        read_pretrained(tmp_path / "missing.pt", "3d_fullres", "unet")
    with pytest.raises(MedsegError, match="is a folder"):
        read_pretrained(tmp_path, "3d_fullres", "unet")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MedsegError, match="not a medseg checkpoint or model bundle"):
        read_pretrained(tmp_path / "notes.txt", "3d_fullres", "unet")
    torch.save({"a": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(MedsegError, match="not a medseg checkpoint"):
        read_pretrained(tmp_path / "plain.pt", "3d_fullres", "unet")
    import zipfile

    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("a.txt", "x")
    with pytest.raises(MedsegError, match="not a medseg model bundle"):
        read_pretrained(tmp_path / "other.zip", "3d_fullres", "unet")


def test_train_from_a_bundle_records_what_was_loaded_and_resume_does_not_reload(tiny_work, monkeypatch):
    source = tiny_work.parent / "source"
    import shutil

    shutil.copytree(tiny_work, source)
    for fold in (1, 0):
        train(source, TrainConfig(epochs=1, fold=fold, **FAST))
    bundle = export_bundle(source, tiny_work.parent / "model.zip")
    src = read_pretrained(bundle, "3d_fullres", "unet")
    assert src.member == "3d_fullres/unet/fold_0 of the bundle (of its 2 networks)"
    pretrained_weights = load_checkpoint(source / "runs/3d_fullres/unet/fold_0/checkpoint_final.pt")["model"]

    cfg = TrainConfig(epochs=1, pretrained=str(bundle), **FAST)
    run = train(tiny_work, dataclasses.replace(cfg, iters_per_epoch=1, lr=1e-9))
    report = RunRecord.load(run / "run_record.json").pretrained_report
    assert report["loaded"] == report["tensors"] > 0 and report["skipped"] == []
    assert report["member"].startswith("3d_fullres/unet/fold_0") and report["source"] == str(bundle.resolve())
    assert "pretrained: loaded" in (run / "training_log.txt").read_text()
    trained = load_checkpoint(run / "checkpoint_final.pt")["model"]
    name = "encoder.1.0.conv.weight"  # one step at lr 1e-9 barely moves the pretrained weights
    assert torch.allclose(trained[name], pretrained_weights[name], atol=1e-6)

    import medseg.training.run as pretrained_module  # where train() calls them

    def fail(*args, **kwargs):
        raise AssertionError("a resumed run loaded the pretrained weights again")

    monkeypatch.setattr(pretrained_module, "load_pretrained", fail)
    monkeypatch.setattr(pretrained_module, "prepare_pretrained", fail)
    train(tiny_work, dataclasses.replace(cfg, epochs=2), resume=True)
    assert load_checkpoint(run / "checkpoint_final.pt")["epoch"] == 2
    assert RunRecord.load(run / "run_record.json").pretrained_report == report
    assert "are not loaded again" in (run / "training_log.txt").read_text()


def test_a_time_budget_with_pretrained_weights_keeps_the_plan(tiny_work):
    plan = Plan.load(tiny_work / "plans.json")
    cfg = TrainConfig(time_budget_minutes=4.0, pretrained="model.zip", configuration="3d_fullres", arch="unet")
    same, kept = fit_run_to_budget(Stage.resolve(plan, "3d_fullres", "unet"), cfg)
    assert same.plan is plan and kept["refit"] is False and "--pretrained" in kept["kept_by"]


def test_pretrained_must_be_a_path():
    assert any("pretrained" in p for p in TrainConfig(pretrained=" ").check())
    assert TrainConfig.from_dict(TrainConfig(pretrained="a.zip").to_dict()).pretrained == "a.zip"
