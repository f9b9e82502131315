"""What a run shows while it trains: ``progress.json`` and ``training_curves.png`` in the run folder.

Both are rewritten (atomically) after every epoch and at the status changes of a run (``training``,
``trained``, ``validating``, ``finished``), so they can be watched from outside.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

from medseg.io.image import atomic_write_bytes, atomic_write_text
from medseg.io.workdir import RunDir
from medseg.training.config import AugmentationConfig

logger = logging.getLogger(__name__)


def augmentation_summary(aug: AugmentationConfig) -> str:
    """``off``, ``spatial + mirroring`` or ``spatial + mirroring + intensity`` (for the start-of-run log)."""
    if not aug.enabled:
        return "off"
    return "spatial + mirroring" + ("" if aug.intensity is False else " + intensity")


def epoch_line(entry: dict[str, Any], val: dict[str, Any], ema_metric: float | None) -> str:
    """The log line of an epoch's end (the trainer logs it under its own logger name).

    Args:
        entry: the epoch's history entry (``epoch``, ``train_loss``, ``lr``, ``it_per_s``, ``epoch_seconds``,
            ``data_wait_seconds``, ``elapsed_seconds``).
        val: the epoch's pseudo Dice (``val_dice``, ``dice_per_class``), empty when it was skipped.
        ema_metric: the EMA of the pseudo Dice (None before the first).
    """
    per_class = ""
    if val.get("dice_per_class"):
        per_class = " [" + ", ".join("-" if v is None else f"{v:.3f}" for v in val["dice_per_class"]) + "]"
    dice = f"{val['val_dice']:.4f}" if val else "-"
    ema = f"{ema_metric:.4f}" if ema_metric is not None else "-"
    return (
        f"epoch {entry['epoch']:d}: loss {entry['train_loss']:.4f}, pseudo Dice {dice} (EMA {ema}){per_class}, "
        f"lr {entry['lr']:.2e}, {entry['it_per_s']:.1f} it/s, {entry['epoch_seconds']:.0f} s (data wait "
        f"{entry['data_wait_seconds']:.1f} s), elapsed {entry['elapsed_seconds'] / 60:.1f} min"
    )


def write_progress_files(run_dir: Path, progress: dict[str, Any], title: str) -> None:
    """Write ``run_dir/progress.json`` and redraw ``training_curves.png`` from its ``history``.

    Args:
        run_dir: the run folder.
        progress: the contents of ``progress.json`` (builtins; a ``history`` list of epoch entries).
        title: the title of the plot (configuration, network, fold).
    """
    run = RunDir(run_dir)
    atomic_write_text(run.progress, json.dumps(progress, indent=1, default=float) + "\n")
    try:
        plot_training_curves(progress.get("history") or [], title, run.training_curves)
    except Exception as exc:  # a plotting problem must never stop training
        logger.warning("could not draw %s: %s", run.training_curves.name, exc)


def plot_training_curves(history: list[dict[str, Any]], title: str, path: Path) -> None:
    """Draw training loss, pseudo Dice (raw and EMA) and learning rate at each epoch end, against the
    iteration, to ``path`` (a PNG).

    Args:
        history: epoch entries with ``epoch``, ``train_loss``, ``lr`` and, where measured, ``val_dice``
            and ``ema_dice``; nothing is drawn when empty.
        title: the title of the figure.
        path: the PNG file (written atomically).
    """
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # x: iterations (epochs cut short by a time budget would distort an epoch axis); a dot per epoch end
    it = [h.get("iteration", h["epoch"]) for h in history]
    style = {"marker": "o", "markersize": 3}
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    axes[0].plot(it, [h["train_loss"] for h in history], label="train loss", **style)
    axes[0].set_ylabel("loss")
    axes[0].legend()
    measured = [h for h in history if h.get("val_dice") is not None]
    m_it = [h.get("iteration", h["epoch"]) for h in measured]
    axes[1].plot(m_it, [h["val_dice"] for h in measured], label="pseudo Dice", alpha=0.6, **style)
    axes[1].plot(m_it, [h.get("ema_dice", float("nan")) for h in measured], label="pseudo Dice (EMA)", **style)
    axes[1].set_ylabel("Dice")
    axes[1].legend()
    axes[2].plot(it, [h["lr"] for h in history], label="learning rate", **style)
    axes[2].set_ylabel("lr")
    axes[2].set_xlabel("iteration")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
