"""Registry: lookup, errors listing valid names, registration, lazy entry points, plan/option checks."""

from __future__ import annotations

import importlib.metadata
import textwrap

import pytest
import torch

from medseg.errors import ConfigError
from medseg.networks import available_networks, build_network, register_network, registry

from .conftest import ISO2, ISO3, tiny_plan


def _build(net, in_channels, num_classes):
    return build_network(net.spec, in_channels, num_classes, patch_size=net.patch_size)


def test_builtin_architectures_are_available():
    assert {"unet", "deeplab", "psp", "fcn", "segresnet", "swinunetr", "dynunet"} <= set(available_networks())
    assert available_networks() == sorted(available_networks())


def test_unknown_architecture_lists_the_valid_names():
    with pytest.raises(
        ConfigError,
        match=r"unknown network architecture 'unte'; available: .*deeplab, dynunet, fcn, psp, segresnet, swinunetr, unet",
    ):
        _build(tiny_plan("unte", ISO3), 1, 2)


def test_register_and_build_a_custom_network(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_network("identity-test")
    def build(net, in_channels, num_classes):
        return torch.nn.Conv2d(in_channels, num_classes, 1)

    assert "identity-test" in available_networks()
    model = _build(tiny_plan("identity-test", ISO2), 3, 5)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5, 32, 32)
    register_network("identity-test")(build)  # same builder again (module reload) is fine
    with pytest.raises(ValueError, match="already registered"):
        register_network("unet")(build)
    with pytest.raises(ValueError, match="lower-case"):
        register_network("My Net")


def test_entry_point_is_loaded_lazily(tmp_path, monkeypatch):
    (tmp_path / "medseg_plugin_test.py").write_text(
        textwrap.dedent("""
        import torch
        LOADED = []
        def build(net, in_channels, num_classes):
            LOADED.append(net.arch)
            return torch.nn.Conv3d(in_channels, num_classes, 1)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    eps = {
        "plugnet": importlib.metadata.EntryPoint("plugnet", "medseg_plugin_test:build", registry.ENTRY_POINT_GROUP),
        "brokennet": importlib.metadata.EntryPoint("brokennet", "no_such_module_xyz:build", registry.ENTRY_POINT_GROUP),
    }
    monkeypatch.setattr(registry, "_entry_points", lambda: eps)
    assert {"plugnet", "brokennet", "unet"} <= set(available_networks())
    assert "plugnet" not in registry._REGISTRY  # listed, not imported yet

    model = _build(tiny_plan("plugnet", ISO3), 2, 4)
    assert isinstance(model, torch.nn.Conv3d) and "plugnet" in registry._REGISTRY
    import medseg_plugin_test

    assert medseg_plugin_test.LOADED == ["plugnet"]
    with pytest.raises(ConfigError, match=r"brokennet.*no_such_module_xyz:build.*failed"):
        _build(tiny_plan("brokennet", ISO3), 2, 4)


def test_plan_and_option_errors_are_config_errors():
    with pytest.raises(ConfigError, match="not divisible"):
        _build(tiny_plan("unet", dict(ISO3, patch_size=(16, 16, 12))), 1, 2)
    with pytest.raises(ConfigError, match=r"unknown options \['residual'\]"):
        _build(tiny_plan("unet", ISO3, options={"residual": True}), 1, 2)
    with pytest.raises(ConfigError, match=r"output_stride must be a int \(one of \[8, 16\]\)"):
        _build(tiny_plan("deeplab", ISO3, options={"output_stride": 32}), 1, 2)
    with pytest.raises(ConfigError, match="residual_encoder must be a bool"):
        _build(tiny_plan("unet", ISO3, options={"residual_encoder": "yes"}), 1, 2)
    with pytest.raises(ConfigError, match="norm must be one of"):
        _build(tiny_plan("psp", ISO3, norm="layer"), 1, 2)
    with pytest.raises(ConfigError, match="in_channels >= 1"):
        _build(tiny_plan("fcn", ISO3), 0, 2)
    with pytest.raises(ConfigError, match="kernel sizes must be odd"):
        _build(tiny_plan("unet", dict(ISO3, kernel_sizes=((3, 3, 3),) * 3 + ((2, 2, 2),))), 1, 2)
