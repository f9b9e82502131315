"""``--quiet`` leaves only warnings and errors on stderr: no progress bars either."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.cli.main import main
from medseg.io.image import ImageGeometry, write_image


def _folders(root: Path) -> tuple[Path, Path]:
    geo = ImageGeometry(
        shape=(4, 6, 6), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel())
    )
    ref = np.zeros((4, 6, 6), np.uint8)
    ref[1:3, 1:5, 1:5] = 1
    for folder in ("pred", "ref"):
        for case in ("a", "b"):
            write_image(ref, geo, root / folder / f"{case}.nii.gz")
    return root / "pred", root / "ref"


@pytest.mark.parametrize("quiet", [False, True])
def test_evaluate_draws_its_bar_only_without_quiet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], quiet: bool
) -> None:
    pred, ref = _folders(tmp_path)
    args = ["evaluate", str(pred), str(ref), "-o", str(tmp_path / "m.json"), "--num-workers", "1"]
    assert main([*args, *(["-q"] if quiet else [])]) == 0
    captured = capsys.readouterr()
    assert ("evaluate:" in captured.err) is not quiet
    assert "Dice" in captured.out  # the result is still printed


def test_quiet_is_one_switch_for_the_process_and_the_next_command_resets_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from medseg.progress import progress_bar, progress_enabled

    pred, ref = _folders(tmp_path)
    args = ["evaluate", str(pred), str(ref), "-o", str(tmp_path / "m.json"), "--num-workers", "1"]
    assert main([*args, "-q"]) == 0
    assert not progress_enabled() and progress_bar(range(3)).disable  # every later bar of the library too
    assert main(args) == 0
    assert progress_enabled() and "evaluate:" in capsys.readouterr().err
    assert progress_bar(range(3), disable=True).disable  # a call site's own disable still applies
