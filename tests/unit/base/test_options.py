"""Typed options (medseg.options) and the one autocast dtype rule (medseg.machine.autocast_dtype)."""

from __future__ import annotations

import json

import pytest
import torch

from medseg.errors import ConfigError, PlanError
from medseg.machine import autocast_dtype
from medseg.options import (
    PRECISIONS,
    CheckpointName,
    DeviceKind,
    NormalizationScheme,
    Optimizer,
    Precision,
    choices,
    parse_option,
    valid_values,
)


def test_members_are_their_strings():
    assert Precision.BF16 == "bf16" and "bf16" == Precision.BF16 and {"bf16": 1}[Precision.BF16] == 1
    assert json.dumps({"p": Precision.FP16}) == '{"p": "fp16"}'
    assert PRECISIONS == ("fp32", "bf16", "fp16") and choices(Precision) == ["auto", "fp32", "bf16", "fp16"]
    assert choices(DeviceKind) == ["cpu", "cuda"] and choices(CheckpointName) == [
        "final",
        "best",
        "latest",
        "snapshots",
    ]
    assert valid_values(NormalizationScheme) == "'ct', 'zscore' or 'none'"


def test_parse_option_names_the_valid_values():
    assert parse_option(Optimizer, "adamw", "optimizer") is Optimizer.ADAMW
    with pytest.raises(
        ConfigError,
        match=r"optimizer must be one of \['auto', 'sgd', 'adamw', 'lookahead-sgd', 'lookahead-adamw'\], got 'adam'",
    ):
        parse_option(Optimizer, "adam", "optimizer")
    with pytest.raises(PlanError, match="precision must be one of"):
        parse_option(Precision, "fp8", "precision", PlanError)


def test_autocast_dtype_keeps_each_callers_rule():
    # training takes the name literally (it refuses fp16 on a CPU before it asks)
    assert autocast_dtype("fp32") is None
    assert autocast_dtype("bf16") is torch.bfloat16
    assert autocast_dtype("fp16") is torch.float16
    # prediction passes its device: fp16 on a CPU runs as bfloat16 (CPU float16 kernels are slow)
    assert autocast_dtype("fp16", "cpu") is torch.bfloat16
    assert autocast_dtype("fp16", "cuda") is torch.float16
    assert autocast_dtype(Precision.BF16, "cuda") is torch.bfloat16 and autocast_dtype("fp32", "cpu") is None
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        autocast_dtype("auto", "cpu")


def test_the_base_module_imports_only_the_standard_library():
    import ast
    import sys
    from pathlib import Path

    import medseg.options

    tree = ast.parse(Path(medseg.options.__file__).read_text())
    roots = {
        n.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
    }
    assert roots - {"medseg"} <= set(sys.stdlib_module_names) | {"__future__"}
