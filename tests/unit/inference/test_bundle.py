"""Model bundles: export -> predict gives the work folder's labels; weights only; every broken bundle refused
with one message naming the file."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch

from medseg.ensembling import bundle_predictor, export_bundle, work_dir_predictor
from medseg.errors import BundleError, MedsegError
from medseg.inference.bundle import (
    BUNDLE_FORMAT_VERSION,
    MANIFEST,
    load_bundle,
    read_bundle_text,
    read_manifest,
)
from medseg.inference.input_guard import TrainingRange
from medseg.inference.training_range import read_training_range
from medseg.io.checkpoint import save_checkpoint

from .conftest import bright_box_image, build_plan

RULES = {
    "format": "medseg-postprocessing-v1",
    "per_label": {"1": [{"op": "largest_component"}]},
    "fitted_on": {"members": [["3d_fullres", "unet"]], "num_cases": 2},
}


def _plan():
    plan = build_plan(spacings={"3d_fullres": (3.0, 0.8, 1.2)}, median_spacing=(3.0, 0.8, 1.2))
    cfg = plan.configuration("3d_fullres")
    net = cfg.network("unet")
    net = dataclasses.replace(net, spec=dataclasses.replace(net.spec, base_features=4, max_features=8))
    cfg = dataclasses.replace(cfg, networks={"unet": net}, mirror_axes=(2,))
    return dataclasses.replace(plan, configurations={"3d_fullres": cfg})


def _fake_run(work, plan, fold):
    torch.manual_seed(fold)
    model = plan.configuration("3d_fullres").network("unet").build(plan.num_channels, plan.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 8, 16, 16))[0].mean().backward()
    opt.step()  # optimizer state (momentum buffers) that must not end up in the bundle
    save_checkpoint(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": 1,
            "iteration": 10,
            "train_config": {},
            "plan": plan.to_dict(),
            "configuration": "3d_fullres",
            "arch": "unet",
        },
        work / "runs" / "3d_fullres" / "unet" / f"fold_{fold}" / "checkpoint_final.pt",
    )


@pytest.fixture
def work(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    _plan().save(work / "plans.json")
    for fold in (0, 1):
        _fake_run(work, _plan(), fold)
    (work / "postprocessing.json").write_text(json.dumps(RULES))
    return work


@pytest.fixture
def bundle(work, tmp_path):
    return export_bundle(work, tmp_path / "out" / "model.zip")


def _image():
    image, _ = bright_box_image()
    return image - 100.0 * (image < 150)  # a box plus noise around 0: several components


def test_bundle_predicts_exactly_what_the_work_folder_predicts(work, bundle, tmp_path):
    from_work = work_dir_predictor(work)
    moved = tmp_path / "elsewhere.zip"
    bundle.rename(moved)
    import shutil

    shutil.rmtree(work)  # the bundle alone is enough
    from_zip = bundle_predictor(moved)
    assert from_zip.describe() == from_work.describe() == "2 x 3d_fullres/unet"
    assert from_zip.postprocess.rules["per_label"] == RULES["per_label"]
    for a, b in zip(from_zip.members, from_work.members):
        assert a.plan == b.plan
        for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    image = _image()
    np.testing.assert_array_equal(
        from_zip.predict_array(image, (3.0, 0.8, 1.2)), from_work.predict_array(image, (3.0, 0.8, 1.2))
    )
    assert len(bundle_predictor(moved, folds=[1]).members) == 1
    assert bundle_predictor(moved, postprocessing=False).postprocess is None
    with pytest.raises(MedsegError, match="holds"):
        bundle_predictor(moved, folds=[3])


def test_bundle_holds_weights_only_labels_and_a_versioned_manifest(work, bundle):
    manifest = read_manifest(bundle)
    assert manifest["format_version"] == BUNDLE_FORMAT_VERSION and manifest["medseg_version"]
    assert manifest["labels"] == {"0": "l0", "1": "l1"}
    assert [m["fold"] for m in manifest["members"]] == ["fold_0", "fold_1"]
    with zipfile.ZipFile(bundle) as zf:
        names = set(zf.namelist())
        assert {"manifest.json", "plans.json", "preprocessing.json", "postprocessing.json"} <= names
        assert not any("preprocessed" in n or n.endswith("checkpoint_final.pt") for n in names)
        weights = torch.load(io.BytesIO(zf.read(manifest["members"][0]["weights"])), weights_only=True)
        preprocessing = json.loads(zf.read("preprocessing.json"))
    assert set(weights) == {"format", "model", "configuration", "arch"}  # no optimizer, RNG or history
    assert preprocessing["3d_fullres"]["spacing_zyx_mm"] == [3.0, 0.8, 1.2]
    # postprocessing fitted on another ensemble stays out
    (work / "postprocessing.json").write_text(json.dumps({**RULES, "fitted_on": {"members": [["2d", "unet"]]}}))
    assert read_manifest(export_bundle(work, bundle))["postprocessing"] is None


def test_bundle_carries_the_rules_decided_from_the_labels(work, tmp_path):
    from medseg.fingerprint import CaseFingerprint, Fingerprint

    (work / "postprocessing.json").unlink()  # no find-best: a --fold all or README-style run
    cases = tuple(
        CaseFingerprint(f"c{i}", (3.0, 0.8, 1.2), (10, 24, 20), (10, 24, 20), 1.0, {1: 100}, {1: (100,)})
        for i in range(12)
    )
    Fingerprint("test", ("ch0",), (0, 1), cases, ()).save(work / "fingerprint.json")
    bundle = export_bundle(work, tmp_path / "prior.zip")
    assert read_manifest(bundle)["postprocessing"] == "postprocessing.json"
    for folds in (None, [1]):  # decided from labels, not fitted on an ensemble: any subset of members keeps it
        rules = bundle_predictor(bundle, folds=folds).postprocess.rules
        assert rules["source"] == "label_statistics" and rules["per_label"] == {"1": [{"op": "largest_component"}]}
        assert rules["quality"]["volumes"]["1"]["present_fraction"] == 1.0  # the volume rules travel too
    assert bundle_predictor(bundle, postprocessing=False).postprocess is None


def _rewrite(src, dst, drop=(), replace=None):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            if name not in drop:
                zout.writestr(name, (replace or {}).get(name, zin.read(name)))
    return dst


def test_broken_bundles_are_refused_naming_the_file(bundle, tmp_path):
    data = bundle.read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated.zip.*truncated or corrupt"):
        bundle_predictor(truncated)

    corrupt = tmp_path / "corrupt.zip"
    with zipfile.ZipFile(bundle) as zf:
        info = zf.getinfo(read_manifest(bundle)["members"][0]["weights"])
    flipped = bytearray(data)
    flipped[info.header_offset + 200] ^= 0xFF  # inside the stored weights: the CRC no longer matches
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(BundleError, match=r"corrupt.zip: members/3d_fullres/unet/fold_0/model.pt .*corrupt"):
        bundle_predictor(corrupt)

    missing = _rewrite(bundle, tmp_path / "missing.zip", drop={"members/3d_fullres/unet/fold_1/model.pt"})
    with pytest.raises(BundleError, match="missing.zip: members/3d_fullres/unet/fold_1/model.pt .*missing"):
        bundle_predictor(missing)

    manifest = json.loads(zipfile.ZipFile(bundle).read(MANIFEST))
    newer = _rewrite(
        bundle,
        tmp_path / "newer.zip",
        replace={
            MANIFEST: json.dumps({**manifest, "format_version": BUNDLE_FORMAT_VERSION + 1, "medseg_version": "9.0"})
        },
    )
    with pytest.raises(BundleError, match=r"newer.zip: bundle format version 2 \(written by medseg 9.0\).*upgrade"):
        bundle_predictor(newer)

    no_manifest = _rewrite(bundle, tmp_path / "plain.zip", drop={MANIFEST})
    with pytest.raises(BundleError, match="plain.zip: no manifest.json found: .*not a medseg model bundle"):
        load_bundle(no_manifest)
    with pytest.raises(BundleError, match="absent.zip: model bundle not found"):
        load_bundle(tmp_path / "absent.zip")


def test_weights_are_loaded_weights_only(bundle, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    name = read_manifest(bundle)["members"][0]["weights"]
    buf = io.BytesIO()
    torch.save({"format": "medseg-bundle-weights-v1", "model": Evil()}, buf, pickle_module=pickle)
    evil = _rewrite(bundle, tmp_path / "evil.zip", replace={name: buf.getvalue()})
    with pytest.raises(BundleError, match="evil.zip: .*model.pt .*cannot be loaded safely"):
        load_bundle(evil)


def test_export_refuses_a_folder_a_bundle_and_an_untrained_work(work, bundle, tmp_path):
    with pytest.raises(MedsegError, match="is a folder"):
        export_bundle(work, tmp_path)
    with pytest.raises(MedsegError, match="is a file, not a work folder"):
        export_bundle(bundle, tmp_path / "again.zip")
    empty = tmp_path / "empty"
    empty.mkdir()
    _plan().save(empty / "plans.json")
    with pytest.raises(MedsegError, match="no trained model"):
        export_bundle(empty, tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists() and not list(tmp_path.glob(".tmp_*"))


def _with_file(src, dst, name, data):
    dst.write_bytes(src.read_bytes())
    with zipfile.ZipFile(dst, "a") as zf:
        zf.writestr(name, data)
    return dst


def test_training_range_and_model_card_in_the_bundle(work, bundle, tmp_path):
    # a work folder without fingerprint.json (like an older bundle): no range, a card saying so
    assert read_training_range(bundle) is None
    card = read_bundle_text(bundle, "MODEL_CARD.md")
    assert card is not None and card.startswith("# Model card: ") and "no fingerprint.json" in card
    assert "bundle networks: 3d_fullres/unet/fold_0, 3d_fullres/unet/fold_1" in card
    tr = TrainingRange("d", ("CT",), 3, (1.0, 0.5, 0.5), (2.0, 0.8, 0.8), orientations=("LPS",))
    with_range = _with_file(bundle, tmp_path / "range.zip", "training_range.json", tr.to_json().encode())
    assert read_training_range(with_range) == tr
    broken = _with_file(bundle, tmp_path / "broken.zip", "training_range.json", b'{"spacing_min": "x"}')
    with pytest.raises(BundleError, match="training_range.json in the bundle is malformed"):
        read_training_range(broken)
