"""`road-sslkd train`: the SSLKD pipeline (and the benchmark's baselines) as resumable stages.

teacher_a, teacher_b     supervised warm-up of the two teachers
teachers_ssl             cross-model semi-supervised teachers (teacher_a_ssl, teacher_b_ssl)
student_sslkd            the SSLKD student, distilled from the semi-supervised teachers (or, with
                         "sslkd_teachers": "warmup", from the supervised ones) on labelled + unlabelled data
student_supervised       baseline: the student network on labelled data only
student_ssl              baseline: the student network with UniMatch-style semi-supervision
student_kd               baseline: distillation from the supervised teachers, labelled data only
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from . import distributed, events
from .baselines import UniMatchStage
from .config import PRETRAIN, SSLKD_TEACHERS, STAGE_NAMES, Config, check_stages, make_config
from .data import DatasetSpec, LabelledSet
from .distillation import DistillStage
from .evaluate import evaluate_model, onnx_throughput
from .export import export_int8, export_run_model
from .models import REGISTRY, build_model, count_parameters, gflops, weights_file
from .plots import PRAccumulator
from .runs import RunDir, install_stop_handlers, stop_requested, training_lock
from .targets import decision_threshold
from .teachers import CrossModelStage, SupervisedStage
from .trainer import Context, Stage, build_context, pick_device, run_stage, seed_everything, split_holdout


def stage_factories() -> dict[str, Callable[[Context], Stage]]:
    return {
        "teacher_a": lambda c: SupervisedStage(c, "teacher_a", c.config.teacher_a),
        "teacher_b": lambda c: SupervisedStage(c, "teacher_b", c.config.teacher_b),
        "teachers_ssl": CrossModelStage,
        "student_supervised": lambda c: SupervisedStage(c, "student_supervised", c.config.student, "student"),
        "student_ssl": UniMatchStage,
        "student_kd": lambda c: DistillStage(c, "student_kd", teachers_of(c.config, "student_kd"), unlabelled=False),
        "student_sslkd": lambda c: DistillStage(c, "student_sslkd", teachers_of(c.config, "student_sslkd"),
                                                unlabelled=True),
    }


def teachers_of(cfg: Config, student: str) -> tuple[str, ...]:
    """The saved teachers a distilled student learns from: KD always the supervised ones, SSLKD per config."""
    unknown = set(cfg.student_teachers) - {"a", "b"}
    if unknown or not cfg.student_teachers:
        raise events.UserError(f"student_teachers must list 'a' and/or 'b', not {cfg.student_teachers}",
                               'e.g. "student_teachers": ["a", "b"]')
    suffix = "" if student == "student_kd" else SSLKD_TEACHERS[cfg.sslkd_teachers]
    return tuple(f"teacher_{t}{suffix}" for t in cfg.student_teachers)


EXAMPLES = 3  # test rasters whose predictions are kept for the report's overlays
STUDENTS = ("student_sslkd", "student_kd", "student_ssl", "student_supervised")


def train(run: RunDir, device_name: str = "auto", command: str = "", export: bool = True) -> dict:
    """Run the configured stages (skipping finished ones), evaluate, export the student, write the report."""
    cfg = run.config
    check_stages(cfg.stages)  # a run folder written before stage names were checked on the way in
    device = pick_device(device_name)
    if not run.dataset.unlabelled and any(s in ("teachers_ssl", "student_ssl", "student_sslkd") for s in cfg.stages):
        events.warning("no unlabelled rasters given: the labelled images serve as the unlabelled pool")
        run.dataset.unlabelled = [p.image for p in run.dataset.labelled]
        run.save()
    if cfg.weights == PRETRAIN:
        _pretrain_encoders(run, command)
    ctx = build_context(run, device)
    factories = stage_factories()
    test_items = LabelledSet(run.dataset.test, cfg.bands, cfg.label_width).items if run.dataset.test else []
    for index, name in enumerate(cfg.stages):
        if distributed.any_rank(stop_requested()):
            raise events.Cancelled(f"stopped before {name}")
        outputs = CrossModelStage.names if name == "teachers_ssl" else (name,)
        described = {n for n in outputs if run.has_model(n) and _described(run, n, bool(test_items))}
        if all(run.has_model(n) for n in outputs):
            # Checked before building: building caches teacher outputs, perhaps deleted since to save disk.
            events.log.info("stage %s already finished, skipped", name)
        else:
            seed_everything(distributed.rank_seed(cfg.seed * 1000 + index))
            # Rank 0 builds first: a stage may cache files in the run folder (teacher targets) that others read.
            started = time.monotonic()
            stage = distributed.main_first(functools.partial(factories[name], ctx))
            setup = time.monotonic() - started  # mostly caching teacher outputs (targets.py), outside train_seconds
            if distributed.is_main():
                # Written before training and, like train_seconds, carried over from a start that left a
                # checkpoint (whose cached maps this start reuses), so setup_seconds counts every start.
                resumed = run.checkpoint_path(name).exists()
                for out_name in outputs:
                    earlier = run.metrics()["models"].get(out_name, {}).get("setup_seconds", 0.0) if resumed else 0.0
                    run.update_metrics(out_name, {"setup_seconds": round(earlier + setup, 1)})
            run_stage(stage, ctx)
        if distributed.is_main():  # the others wait for rank 0 at the next stage (or at the end)
            for out_name in (n for n in outputs if n not in described):
                # The saved model: a stage finished in an earlier start holds only freshly built networks.
                _describe(run, out_name, run.load_model(out_name).to(device), ctx, test_items)
    if not distributed.is_main():
        distributed.barrier()  # rank 0 alone exports and reports; the others end with it
        return run.metrics()
    # The best kind of student the run holds, not the first of this call's stages: a baseline trained later
    # with --stages must not replace the SSLKD student as the run's student.onnx.
    student = next((s for s in STUDENTS if run.has_model(s)), None)
    if student is not None and export:
        events.progress("export", 0, 1)
        onnx_path = export_run_model(run, student, run.path / "student.onnx", overwrite=True)
        events.artifact("onnx", onnx_path)
        (run.path / "student.int8.onnx").unlink(missing_ok=True)  # never beside a student.onnx it does not copy
        int8 = export_int8(run, onnx_path, overwrite=True) if cfg.int8 else None
        shipped = {"mpx_per_s": onnx_path} | ({"mpx_per_s_int8": int8} if int8 is not None else {})
        for key, speed in zip(shipped, onnx_throughput(list(shipped.values()), len(cfg.bands), size=cfg.tile)):
            run.update_metrics(student, {key: round(speed, 3)})
            events.metric(key, speed, stage=student)
        events.progress("export", 1, 1)
    metrics = run.metrics()
    (run.path / "report.md").write_text(report_markdown(run, metrics, command))
    events.artifact("metrics", run.path / "metrics.json")
    events.artifact("report", run.path / "report.md")
    distributed.barrier()
    return metrics


def _pretrain_encoders(run: RunDir, command: str) -> None:
    """The "pretrain" weights setting: encoders pretrained on the run's own labelled and unlabelled images
    (pretrain.py) into RUN/pretrained, which then becomes the run's weights folder. A start stopped during the
    pretraining keeps the setting, and the next start goes on with the encoders it had not finished."""
    from .pretrain import pretrain

    folder = run.path / "pretrained"
    # Never on the images that validate the run: pixels seen in pretraining flatter their validation scores.
    spec = replace(run.dataset, labelled=split_holdout(run.config, run.dataset)[0])
    distributed.main_first(functools.partial(pretrain, spec, run.config, folder, command))
    run.config.weights = str(folder.resolve())
    run.save()


def check_weights(cfg: Config) -> None:
    """A weights file (or a folder's file) that does not fit a model of the run fails now, not after the stages
    before it."""
    if cfg.weights in ("imagenet", "none", PRETRAIN):
        return  # the hub and its cache fall back to random initialisation per model, with a warning
    archs = {arch for stage, arch in (("teacher_a", cfg.teacher_a), ("teacher_b", cfg.teacher_b))
             if stage in cfg.stages}
    if any(stage.startswith("student") for stage in cfg.stages):
        archs.add(cfg.student)
    for arch in sorted(archs):
        # A folder without this model's file means random initialisation, said when the stage builds it.
        if not Path(cfg.weights).is_dir() or weights_file(REGISTRY[arch].encoder, cfg.weights) is not None:
            build_model(arch, len(cfg.bands), cfg.weights)


def _described(run: RunDir, name: str, tested: bool) -> bool:
    """Whether an earlier start already measured this saved model (a finished run resumes in seconds)."""
    values = run.metrics()["models"].get(name, {})
    return "params" in values and "threshold" in values and (not tested or "iou" in values)


def _describe(run: RunDir, name: str, model: object, ctx: Context, test_items: list) -> None:
    """Parameters, GFLOPs, decision threshold and, when test rasters exist, test metrics of a trained model
    (at its threshold, and IoU at 0.5 for comparison)."""
    cfg = run.config
    threshold = decision_threshold(ctx, model)
    values = {"params": count_parameters(model), "gflops": round(gflops(model, len(cfg.bands)), 3),
              "threshold": threshold}
    events.metric("threshold", threshold, stage=name)
    if test_items:
        events.progress("evaluate", 0, 1, model=name)
        pr, examples = PRAccumulator(), {}

        def observe(index: int, prob: np.ndarray, road: np.ndarray, known: np.ndarray) -> None:
            pr.update(prob, road, known)
            if index < EXAMPLES:  # a raster's strips come in row order: its rows are joined below
                examples.setdefault(index, []).append(np.round(prob * 255).astype(np.uint8))

        values.update(evaluate_model(model, test_items, ctx.normalizer, cfg.tile, cfg.overlap, ctx.device,
                                     observe, threshold).summary())
        values["iou_at_0.5"] = pr.iou(0.5)
        run.save_evaluation(name, pr, [np.concatenate(rows) for rows in examples.values()])
        for key in ("iou", "f1"):
            events.metric(f"test_{key}", values[key], stage=name)
    run.update_metrics(name, values)


COLUMNS = (("iou", "IoU"), ("iou_at_0.5", "IoU @0.5"), ("threshold", "Threshold"), ("f1", "F1"),
           ("precision", "Precision"), ("recall", "Recall"),
           ("relaxed_f1", "Relaxed F1"), ("params", "Params (M)"), ("gflops", "GFLOPs/512²"),
           ("mpx_per_s", "Mpx/s"), ("setup_seconds", "Setup s"), ("train_seconds", "Train s"))


QUALITY_KEYS = ("iou", "iou_at_0.5", "f1", "precision", "recall", "relaxed_f1")  # fractions, shown in percent


def metrics_table(models: dict[str, dict]) -> str:
    """Markdown table of model metrics (fractions shown as percentages)."""
    lines = ["| Model | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for name, values in models.items():
        cells = []
        for key, _ in COLUMNS:
            v = values.get(key)
            if v is None:
                cells.append("")
            elif key == "params":
                cells.append(f"{v / 1e6:.2f}")
            elif key == "threshold":
                cells.append(f"{v:.3f}")
            elif key in QUALITY_KEYS:
                std = values.get(f"{key}_std")
                cells.append(f"{100 * v:.1f}" + (f" ± {100 * std:.1f}" if std else ""))
            else:
                cells.append(f"{v:.1f}" if isinstance(v, float) else str(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(run: RunDir, metrics: dict, command: str) -> str:
    cfg, spec = run.config, run.dataset
    return "\n".join([
        f"# Road SSLKD run: {run.path.name}",
        "",
        f"Preset `{cfg.preset}`, teachers `{cfg.teacher_a}` + `{cfg.teacher_b}`, student `{cfg.student}`, "
        f"seed {cfg.seed}. Data: {len(spec.labelled)} labelled, {len(spec.unlabelled)} unlabelled, "
        f"{len(spec.test)} test rasters. Stages: {', '.join(cfg.stages)}.",
        "",
        "Test metrics are for the road class on whole test rasters (sliding window), in percent;"
        " relaxed F1 counts a hit within 3 pixels; Mpx/s is onnxruntime on this machine's CPU.",
        "",
        metrics_table(metrics["models"]),
        "",
        f"Command: `{command}`",
        "",
    ])


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="dataset folder with split.json")
    p.add_argument("--labelled", nargs="+", default=[], metavar="IMAGE:LABEL",
                   help="labelled pairs; LABEL is a raster mask (road > 0) or a vector file of road lines/polygons")
    p.add_argument("--unlabelled", nargs="+", default=[], metavar="IMAGE", help="unlabelled rasters")
    p.add_argument("--test", nargs="+", default=[], metavar="IMAGE:MASK", help="test pairs for the final metrics")


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="tiny (a few minutes, tests), cpu (2-core profile, the default) or gpu (paper)")
    p.add_argument("--config", type=Path, help="JSON file overriding any setting")
    p.add_argument("--steps-scale", type=float, help="multiply every stage's steps (training length)")
    p.add_argument("--seed", type=int, help="random seed (default: the preset's, 0)")
    p.add_argument("--bands", help="1-based bands to use, e.g. 1,2,3")
    p.add_argument("--label-width", type=float, help="road width for vector labels, in the image CRS's units")
    p.add_argument("--weights", help="'imagenet', 'none', 'pretrain' (learn them first from the run's own "
                   "images: road-sslkd pretrain), a local weights file, or a folder with one file per encoder "
                   "(resnet34.pth, mobilenet_v2.pth...)")
    p.add_argument("--device", help="auto, cpu or cuda (default: auto; a resumed run keeps its own)")


def config_from_args(args: argparse.Namespace, **extra: object) -> Config:
    """The preset (cpu when none is given), the --config file and the flags; checked before anything is written."""
    try:
        bands = [int(b) for b in args.bands.split(",")] if args.bands else None
    except ValueError as exc:
        raise events.UserError(f"--bands {args.bands} is not a list of band numbers", "e.g. --bands 1,2,3") from exc
    weights = args.weights
    if weights not in (None, "imagenet", "none", PRETRAIN):
        weights = str(Path(weights).resolve())  # the run folder keeps it: a resume may start elsewhere
    cfg = make_config(args.preset or "cpu", args.config, steps_scale=args.steps_scale, seed=args.seed, bands=bands,
                      label_width=args.label_width, weights=weights, device=args.device, **extra)
    check_weights(cfg)  # before a run folder is written
    return cfg


def dataset_from_args(args: argparse.Namespace) -> DatasetSpec:
    return DatasetSpec.from_args(args.data, labelled=args.labelled, unlabelled=args.unlabelled, test=args.test)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train teachers and the SSLKD student, export student.onnx")
    p.add_argument("--out", type=Path, help="new run folder")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a stopped run")
    p.add_argument("--stages", help=f"comma-separated subset of: {', '.join(STAGE_NAMES)}")
    add_data_arguments(p)
    add_config_arguments(p)
    p.set_defaults(func=_run)


# What `train --resume` may be given besides the run folder: the rest lives in the run's config.json.
RESUME_FLAGS = ("stages", "device")


def _refuse_ignored_flags(args: argparse.Namespace) -> None:
    """Data and settings flags next to --resume would be silently ignored: refuse them instead."""
    own = {"command", "verbose", "func", "command_line", "resume", *RESUME_FLAGS}
    given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items() if k not in own and v not in (None, [])]
    if given:
        raise events.UserError(
            f"--resume continues {args.resume} with the data and settings of its own config.json; "
            f"{', '.join(given)} would be ignored",
            f"drop {', '.join(given)} (with --resume only --stages and --device apply), or start a new run with --out")


def _run(args: argparse.Namespace) -> None:
    install_stop_handlers()
    with contextlib.ExitStack() as held:
        _train_command(args, held)


def _train_command(args: argparse.Namespace, held: contextlib.ExitStack) -> None:
    """``train``: a new run or a resumed one, its folder locked by the main process (``held``) until the end."""
    stages = check_stages(args.stages.split(",")) if args.stages else None
    if args.resume:
        _refuse_ignored_flags(args)
        run = RunDir.open(args.resume)
        run.require_unchanged_images()
        distributed.init(pick_device(args.device or run.config.device))  # under torchrun only
        if distributed.is_main():  # before anything is changed: another process may be training it
            held.enter_context(training_lock(run.path))
        check_weights(run.config)  # a weights file may have moved since the run started
        # What this start changes stays the run's: a later plain --resume keeps its stages and device.
        changes = {key: value for key, value in (("stages", stages), ("device", args.device)) if value is not None}
        for key, value in changes.items():
            setattr(run.config, key, value)
        if changes:
            run.save()
    else:
        if not args.out:
            raise events.UserError("no run folder given", "pass --out RUN_DIR (or --resume RUN_DIR)")
        spec = dataset_from_args(args)
        if not spec.labelled:
            raise events.UserError("no labelled data", "pass --labelled IMAGE:LABEL ... or --data DIR")
        cfg = config_from_args(args, stages=stages)
        distributed.init(pick_device(cfg.device))  # under torchrun only
        # Open every raster before anything is written, so bad input leaves no run folder behind.
        with tempfile.TemporaryDirectory() as tmp:
            probe = RunDir(Path(tmp), cfg, spec, None)
            build_context(probe, pick_device(cfg.device))
        if distributed.is_main():
            run = RunDir.create(args.out, cfg, spec)
            held.enter_context(training_lock(run.path))
            run.normalizer = probe.normalizer
            run.save()
        distributed.barrier()
        if not distributed.is_main():
            run = RunDir.open(args.out)
    metrics = train(run, run.config.device, args.command_line)
    int8 = run.path / "student.int8.onnx"
    events.emit("done", run_dir=str(run.path), student=str(run.path / "student.onnx"),
                student_int8=str(int8) if int8.exists() else None, models=metrics["models"])
