"""The embedded default: the whole pipeline on a synthetic dataset the package generates itself.

``run_demo`` generates training and test cases, plans for the local device with a time budget, trains
fold ``all`` for that budget, predicts the test cases, evaluates them and writes an overlay PNG.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from medseg.ensembling import work_dir_predictor
from medseg.evaluation import evaluate_folders
from medseg.inference import predict_folder
from medseg.io.image import atomic_write_bytes, read_image
from medseg.io.synthetic import generate_synthetic_dataset
from medseg.pipeline import plan_and_preprocess, record_postprocessing_prior
from medseg.planning.planner import PlannerOptions
from medseg.training import TrainConfig, train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoOptions:
    """Settings of ``medseg demo``.

    Attributes:
        output_dir: folder the demo works in (data, work folder, predictions, overlay).
        minutes: training time budget.
        num_cases: synthetic training cases (3 more are generated as unseen test cases).
        device: ``cpu`` or ``cuda``.
        seed: seed of the synthetic data.
    """

    output_dir: Path
    minutes: float = 3.0
    num_cases: int = 12
    device: str = "cpu"
    seed: int = 0


@dataclass
class DemoResult:
    """What the demo produced."""

    work_dir: Path
    prediction_dir: Path
    overlay_png: Path
    mean_dice: float
    dice_per_label: dict[int, float] = field(default_factory=dict)

    def summary(self) -> str:
        per = ", ".join(f"label {k}: {v:.3f}" for k, v in self.dice_per_label.items())
        return (
            f"demo finished: mean foreground Dice on unseen test cases {self.mean_dice:.3f} ({per})\n"
            f"  work folder: {self.work_dir}\n  predictions: {self.prediction_dir}\n  overlay: {self.overlay_png}"
        )


def run_demo(options: DemoOptions) -> DemoResult:
    """Run generate -> plan -> train -> predict -> evaluate -> overlay. Returns the test Dice."""
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = generate_synthetic_dataset(out / "data", num_cases=options.num_cases, seed=options.seed)
    test = generate_synthetic_dataset(out / "test", num_cases=3, seed=options.seed + 1000)
    work = out / "work"

    planner_options = PlannerOptions(device=options.device, time_budget_minutes=options.minutes)
    result = plan_and_preprocess(data, work, planner_options, num_workers=1)
    plan = result.plan
    cfg = plan.configuration()
    logger.info("demo: training %s/%s for %.1f min", cfg.name, cfg.default_arch, options.minutes)
    run_dir = train(
        work,
        TrainConfig(
            configuration=cfg.name,
            arch=cfg.default_arch,
            fold="all",
            time_budget_minutes=options.minutes,
            device=options.device,
        ),
    )
    record_postprocessing_prior(work, run_dir, "all")
    predictor = work_dir_predictor(work, device=options.device)
    pred_dir = out / "predictions"
    predict_folder(test / "imagesTr", pred_dir, predictor, overwrite=True)
    report = evaluate_folders(pred_dir, test / "labelsTr", output=out / "metrics.json")
    dice = {int(lab): float(v["dice"]) for lab, v in report["mean"].items() if v["dice"] is not None}
    mean = float(report["foreground_mean"]["dice"] or 0.0)
    first = sorted((test / "imagesTr").glob("*.nii.gz"))[0]
    overlay = write_overlay_png(
        first, pred_dir / first.name, out / "overlay.png", reference_path=test / "labelsTr" / first.name
    )
    return DemoResult(work_dir=work, prediction_dir=pred_dir, overlay_png=overlay, mean_dice=mean, dice_per_label=dice)


def write_overlay_png(image_path: Path, seg_path: Path, png_path: Path, reference_path: Path | None = None) -> Path:
    """Write a PNG of the slice (along Z) of ``image_path`` with the most predicted foreground.

    Panels: the image, the prediction ``seg_path`` overlaid and, when given, the reference
    ``reference_path`` overlaid. Written atomically.
    """
    img, geo = read_image(image_path)
    seg, _ = read_image(seg_path)
    # pick the slice with the most foreground
    z = int(np.argmax((seg > 0).reshape(seg.shape[0], -1).sum(1))) if seg.any() else seg.shape[0] // 2
    aspect = geo.spacing[1] / geo.spacing[2]
    panels: list[tuple[str, np.ndarray | None]] = [("image", None), ("prediction", seg)]
    if reference_path is not None:
        panels.append(("reference", read_image(reference_path)[0]))
    fig = Figure(figsize=(4 * len(panels), 4))  # no pyplot: the Agg canvas, no global backend state
    axes = fig.subplots(1, len(panels))
    for ax, (title, labels) in zip(axes, panels):
        ax.imshow(img[z], cmap="gray", aspect=aspect)
        if labels is not None:
            masked = np.ma.masked_where(labels[z] == 0, labels[z])
            ax.imshow(masked, cmap="tab10", alpha=0.5, vmin=0, vmax=9, aspect=aspect)
        ax.set_title(f"{title} ({image_path.name}, z={z})", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(png_path, buf.getvalue())
    return png_path
