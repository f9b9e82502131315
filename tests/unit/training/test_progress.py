"""training_curves.png is drawn from the epoch history, including epochs without a pseudo Dice."""

from __future__ import annotations

from medseg.training.progress import plot_training_curves


def test_plot_writes_png_with_unmeasured_epochs(tmp_path):
    history = [
        {"epoch": 1, "iteration": 250, "train_loss": 0.46, "lr": 1e-3, "val_dice": 0.86, "ema_dice": 0.86},
        {"epoch": 2, "iteration": 291, "train_loss": 0.20, "lr": 4e-5},  # cut short by the budget: no Dice
    ]
    out = tmp_path / "curves.png"
    plot_training_curves(history, "3d_fullres/unet fold_0", out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
    assert not list(tmp_path.glob("*.tmp*"))


def test_plot_nothing_for_empty_history(tmp_path):
    out = tmp_path / "curves.png"
    plot_training_curves([], "t", out)
    assert not out.exists()
