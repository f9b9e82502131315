"""Reading a plain state dict for ``--pretrained`` (MONAI bundles, Auto3DSeg): where the tensors are found in
the saved object, the wrapper prefixes dropped and the network's prefix added, and the files refused in one
message naming them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg.errors import MedsegError
from medseg.planning.plan import Plan
from medseg.planning.stage import Stage
from medseg.training.pretrained import check_match, match_weights
from medseg.training.pretrained_source import PretrainedSource, find_state_dict, read_pretrained


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"conv.weight": torch.randn(4, 1, 3, 3), "conv.bias": torch.randn(4), "norm.num_batches": torch.tensor(3)}


@pytest.mark.parametrize(
    ("saved", "where"),
    [
        (_state(), "the whole file"),
        ({"state_dict": _state(), "epoch": 300, "best_metric": 0.9}, "its 'state_dict' entry"),
        ({"model": _state(), "optimizer": {"state": {}, "param_groups": []}}, "its 'model' entry"),
        ({"state_dict": {f"module.{n}": t for n, t in _state().items()}}, "its 'state_dict' entry"),
        ({f"_orig_mod.module.{n}": t for n, t in _state().items()}, "the whole file"),
    ],
)
def test_the_state_dict_is_found_and_wrapper_prefixes_dropped(saved, where):
    found = find_state_dict(saved)
    assert found is not None
    state, found_where = found
    assert found_where == where and list(state) == list(_state())
    assert all(torch.equal(state[n], t) for n, t in _state().items())


def test_objects_without_tensors_hold_no_state_dict():
    assert find_state_dict({"epoch": 3, "state_dict": {"a": 1}}) is None
    assert find_state_dict([torch.zeros(2)]) is None


def test_a_plain_state_dict_is_named_onto_the_wrapper(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"state_dict": {**_state(), "monai.already.weight": torch.ones(2)}, "epoch": 1}, path)
    source = read_pretrained(path, "3d_fullres", "segresnet", module_prefix="monai.")
    assert source.plan is None and source.arch is None and source.path == path
    assert list(source.state) == [
        "monai.conv.weight",
        "monai.conv.bias",
        "monai.norm.num_batches",
        "monai.already.weight",
    ]
    assert torch.equal(source.state["monai.conv.weight"], _state()["conv.weight"])
    assert source.member == "plain state dict of 4 tensors: its 'state_dict' entry"


def test_files_without_weights_are_refused_naming_the_file(tmp_path):
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "meta.pt")
    with pytest.raises(
        MedsegError, match=r"meta\.pt: not a medseg checkpoint, and holds no state dict .* \['epoch', 'note'\]"
    ):
        read_pretrained(tmp_path / "meta.pt", "3d_fullres", "segresnet", module_prefix="monai.")
    torch.save(nn.Conv3d(1, 2, 3), tmp_path / "module.pt")  # a whole module: its classes would have to be unpickled
    with pytest.raises(
        MedsegError, match=r"module\.pt: not a medseg checkpoint or contains objects that cannot be loaded"
    ):
        read_pretrained(tmp_path / "module.pt", "3d_fullres", "segresnet", module_prefix="monai.")
    torch.save(_state(), tmp_path / "plain.pt")
    with pytest.raises(MedsegError, match=r"plain\.pt: .*plain state dict of 3 tensors .*this run trains unet"):
        read_pretrained(tmp_path / "plain.pt", "3d_fullres", "unet")


def test_a_plain_state_dict_that_fits_nothing_names_both_sides(tiny_work):
    stage = Stage.resolve(Plan.load(tiny_work / "plans.json"), "3d_fullres", "unet")
    network = stage.network.build(stage.in_channels, stage.num_classes).state_dict()
    state = {f"monai.{n}": t for n, t in _state().items()}
    source = PretrainedSource(tiny_work / "x.pt", "plain state dict of 3 tensors", state, None, None, None)
    match = match_weights(network, state)
    assert match.loaded == ()
    first = next(iter(network))
    with pytest.raises(MedsegError) as err:
        check_match(match, source, stage)
    message = str(err.value)
    assert message.startswith(f"{tiny_work / 'x.pt'}: 0 of {len(network)} tensors match: the pretrained network")
    assert "monai.conv.weight 4x1x3x3" in message and "3d_fullres/unet" in message and first in message
