"""`road-sslkd demo`: synthetic data -> short SSLKD training -> ONNX student -> prediction -> picture.

Everything lands in one folder; running it again resumes the run and refreshes predictions and picture.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from . import events
from .config import make_config
from .data import DatasetSpec
from .pipeline import metrics_table, train
from .runs import RunDir, install_stop_handlers

# The cpu preset's networks with a budget that finishes in a few minutes on 2 cores.
DEMO_SETTINGS = dict(
    batch=4, batch_unlabelled=4, steps={"teacher": 60, "teachers_ssl": 40, "student": 100},
    val_every=20, log_every=10, checkpoint_every=20,
)


def render_overlay(image_path: Path, probability_path: Path, mask_path: Path, out: Path) -> Path:
    """PNG of the scene with predicted roads in red and the true road outline in cyan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import rasterio
    from scipy import ndimage

    with rasterio.open(image_path) as src:
        rgb = np.moveaxis(src.read([1, 2, 3]), 0, -1)
    with rasterio.open(probability_path) as src:
        road = src.read(1) >= 128
    with rasterio.open(mask_path) as src:
        truth = src.read(1) > 0
    outline = truth & ~ndimage.binary_erosion(truth, iterations=1)
    overlay = rgb.astype(np.float32) / 255
    overlay[road] = 0.45 * overlay[road] + 0.55 * np.array([1.0, 0.1, 0.1])
    overlay[outline] = [0.0, 1.0, 1.0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.3))
    axes[0].imshow(rgb)
    axes[0].set_title("Synthetic scene (test split)")
    axes[1].imshow(overlay)
    axes[1].set_title("Student: roads (red), ground truth outline (cyan)")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run_demo(out: Path, device: str = "auto", command: str = "road-sslkd demo") -> dict:
    from .demo_data import write_demo_dataset
    from .onnx_runtime import load_model
    from .predict import predict_file

    data = out / "data"
    if not (data / "split.json").exists():
        events.progress("demo-data", 0, 1)
        write_demo_dataset(data)
    spec = DatasetSpec.from_split(data)
    run_path, config = out / "run", make_config("cpu", **DEMO_SETTINGS)
    if (run_path / "config.json").exists():
        run = RunDir.open(run_path)
        if run.config.to_json() != config.to_json():  # an older version's demo: keep it, start afresh
            n = 1
            while (out / f"run.old-{n}").exists():
                n += 1
            kept = out / f"run.old-{n}"
            events.warning(f"{run_path} was made with other settings (an earlier version); moved to {kept}")
            run_path.rename(kept)
    if not (run_path / "config.json").exists():
        run = RunDir.create(run_path, config, spec)
    metrics = train(run, device, command)
    model = load_model(run_path / "student.onnx")
    predictions = out / "predictions"
    predictions.mkdir(exist_ok=True)
    outputs = []
    for i, pair in enumerate(spec.test):
        events.progress("predict", i, len(spec.test))
        target = predictions / f"{pair.image.stem}_roads.tif"
        predict_file(model, pair.image, target)
        outputs.append(target)
        events.artifact("probability", target)
    picture = render_overlay(spec.test[0].image, outputs[0], spec.test[0].label, out / "demo.png")
    events.artifact("picture", picture)
    return metrics


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="the whole job on embedded synthetic data, in minutes")
    p.add_argument("--out", type=Path, default=Path("demo"), help="output folder (default: demo)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    install_stop_handlers()
    metrics = run_demo(args.out, args.device, args.command_line)
    events.log.info("\n\nTest metrics on the synthetic test scenes:\n\n%s\n", metrics_table(metrics["models"]))
    events.log.info("Outputs in %s: run/student.onnx (the student), run/report.md, predictions/*.tif, demo.png",
                    args.out.resolve())
    events.emit("done", out=str(args.out), picture=str(args.out / "demo.png"))
