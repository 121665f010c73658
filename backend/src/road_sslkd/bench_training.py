"""`road-sslkd bench-training`: seconds per training step on this machine.

By default one supervised optimiser step (forward, BCE + Dice, backward, AdamW) of the ``cpu`` preset's batch
of crops, float32 against mixed precision, for its teachers and student or the ``--models`` named (candidates
outside the registry too), with the trainer's memory format (channels_last) and autocast
(precision.amp_dtype), median of a few steps after a warm-up. Random weights and images: the cost of a step
does not depend on them.

With ``--run`` it times one optimiser step of each stage of a trained run instead: the stage's own losses on
its own batches and cached teacher outputs, as the trainer runs it, which is what a benchmark's budget is
made of.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import segmentation_models_pytorch as smp
import torch

from . import events, precision
from .bench import machine
from .config import STAGE_NAMES, check_stages, make_config
from .losses import seg_loss
from .models import Architecture, SegModel, build_model, count_parameters
from .pipeline import stage_factories
from .runs import RunDir
from .trainer import Context, batch_to, build_context, pick_device

CPU = make_config("cpu")
STAGE_STEPS = 10  # timed steps per stage with --run: random crops and CutMix boxes make its steps vary more


def candidate(spec: str) -> SegModel:
    """A registered model, or ``Family:encoder`` (any smp decoder class and encoder) for candidates that are
    not in the registry, with random weights."""
    if ":" not in spec:
        return build_model(spec, 3, "none")
    family, encoder = spec.split(":", 1)
    if not hasattr(smp, family):
        raise events.UserError(f"no smp architecture '{family}' in {spec}", "write e.g. Linknet:resnet18")
    try:
        return SegModel(Architecture(family, encoder, "candidate").build(3, None), spec)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise events.UserError(f"cannot build {spec}: {exc}", "name an encoder smp or timm (tu-...) knows") from exc


def step_seconds(spec: str, dtype: Optional[torch.dtype], batch: int, crop: int, steps: int = 5,
                 compiled: bool = False) -> float:
    """Median seconds of one supervised step of ``spec`` (see ``candidate``) on the CPU in ``dtype`` (None:
    float32); ``compiled`` runs it through torch.compile, whose compilation the warm-up steps absorb."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = candidate(spec).train().to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if compiled else model
    image = torch.randn(batch, 3, crop, crop).to(memory_format=torch.channels_last)
    label = (torch.rand(batch, crop, crop) > 0.8).float()
    valid = torch.ones_like(label, dtype=torch.bool)

    def step() -> None:
        with precision.autocast(device, dtype):
            loss = seg_loss(forward(image), label, valid)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return _median_seconds(step, steps)[0]


def _median_seconds(step: Callable[[], None], steps: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``step`` over ``steps`` calls after two warm-up calls (the first steps
    allocate and pick kernels). CPU seconds count every thread of this process."""
    wall, cpu = [], []
    for _ in range(steps + 2):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall[2:]), statistics.median(cpu[2:])


def stage_step_seconds(ctx: Context, name: str, steps: int = STAGE_STEPS) -> tuple[float, float, int]:
    """Median wall and CPU seconds of one optimiser step of stage ``name`` of the run behind ``ctx``, and the
    steps the run's config gives the stage. A step is its batches (cached teacher outputs attached, computed
    first if the run lacks them), losses, backward and AdamW, in the trainer's memory format and precision.
    CPU seconds are what a step costs when benchmark seeds share the cores. Nothing in the run changes but
    that cache."""
    torch.manual_seed(0)
    stage = stage_factories()[name](ctx)
    stage.progress = 0.5  # past any ramp-up: every loss term is computed
    modules = stage.trainable()
    for module in modules.values():
        module.to(ctx.device).train().to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW([p for m in modules.values() for p in m.parameters()], lr=1e-4)
    dtype = precision.amp_dtype(ctx.device, ctx.config.amp)
    labelled, unlabelled = stage.samplers()
    cfg = ctx.config

    def step() -> None:
        lab = batch_to(labelled.sample(cfg.batch), ctx.device)
        unl = batch_to(unlabelled.sample(cfg.batch_unlabelled), ctx.device) if stage.uses_unlabelled else None
        with precision.autocast(ctx.device, dtype):
            loss = stage.losses(lab, unl)["loss"]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return *_median_seconds(step, steps), cfg.stage_steps(stage.step_kind)


def _header(title: str, threads: int, what: str, command: str, steps: int = 5) -> list[str]:
    info = machine()
    return [
        f"# {title}",
        "",
        f"{datetime.date.today().isoformat()}, {info['cpu']}, nproc {os.cpu_count()}, {threads} thread(s), "
        f"torch {info['torch']}. {what}, median of {steps} after 2 warm-up steps. Load average at the end: "
        f"{os.getloadavg()[0]:.1f}.",
        "",
        f"Training on this CPU runs in {_training_dtype()}.",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
    ]


def stage_report_markdown(rows: list[tuple[str, float, float, int]], run: RunDir, command: str, threads: int) -> str:
    cfg = run.config
    lines = _header("Training speed per stage", threads,
                    f"One optimiser step of each stage of the run {run.path} (preset `{cfg.preset}`, {cfg.batch} "
                    f"labelled + {cfg.batch_unlabelled} unlabelled crops of {cfg.crop}² where the stage uses them)",
                    command, STAGE_STEPS)
    lines += ["| stage | s/step | CPU s/step | steps | minutes |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {seconds:.3f} | {cpu:.3f} | {steps} | {seconds * steps / 60:.1f} |"
              for name, seconds, cpu, steps in rows]
    total = sum(seconds * steps for _, seconds, _, steps in rows) / 60
    lines += ["", f"Steps of these stages on one core alone: {total:.0f} min (caching teacher outputs, validation "
              "curves and evaluation not included)."]
    return "\n".join(lines) + "\n"


def report_markdown(rows: list[tuple[str, int, float, Optional[float]]], command: str, threads: int,
                    dtype: Optional[torch.dtype], compiled: bool = False) -> str:
    mixed = str(dtype).removeprefix("torch.") if dtype else None
    what = (f"One supervised step of {CPU.batch} x {CPU.crop}² crops (the `cpu` preset's batch), channels_last"
            + (", torch.compile (its compilation in the warm-up)" if compiled else ""))
    lines = _header("Training speed", threads, what, command) + [
        f"| model | params (M) | float32 s/step | {mixed or 'mixed'} s/step | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, params, fp32, low in rows:
        lines.append(f"| {name} | {params / 1e6:.2f} | {fp32:.3f} | "
                     + (f"{low:.3f} | {fp32 / low:.2f}x |" if low else "- | - |"))
    return "\n".join(lines) + "\n"


def _training_dtype() -> str:
    dtype = "float32" if precision.amp_dtype(torch.device("cpu")) is None else "bfloat16"
    if os.environ.get(precision.CPU_BF16_ENV) in ("0", "1"):
        return f"{dtype} (set by {precision.CPU_BF16_ENV})"
    if not precision.cpu_has_native_bf16():
        return "float32 (no native bfloat16, which would only be emulated)"
    if dtype == "float32":
        return "float32 (native bfloat16, but precision.cpu_bf16_pays found it no faster)"
    return "bfloat16 (precision.cpu_bf16_pays found it faster)"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench-training", help="seconds per training step, float32 and mixed precision")
    p.add_argument("--out", type=Path, required=True, help="markdown file, e.g. docs/benchmarks/training_speed.md")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default: 1, as each seed of `bench --jobs` trains on one core)")
    p.add_argument("--models", help="comma-separated registered models or smp Family:encoder candidates "
                   "(e.g. Linknet:tu-regnetx_004); default: the cpu preset's teachers and student")
    p.add_argument("--compile", action="store_true", help="run the steps through torch.compile")
    p.add_argument("--run", type=Path, help="a trained run folder (e.g. a benchmark seed): time one step of each "
                   "of its stages instead, with their own losses and cached teacher outputs")
    p.add_argument("--stages", help=f"with --run, comma-separated stages (default: all of {', '.join(STAGE_NAMES)})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    if args.out.exists() and not args.overwrite:
        raise events.UserError(f"{args.out} exists", "pass --overwrite to replace the report")
    torch.set_num_threads(args.threads)
    if args.run is not None:
        _run_stages(args)
        return
    if args.stages:
        raise events.UserError("--stages needs --run", "name the run folder whose stages to time")
    dtype = torch.bfloat16 if precision.cpu_has_native_bf16() else None  # measured even where it does not pay
    names = args.models.split(",") if args.models else [CPU.teacher_a, CPU.teacher_b, CPU.student]
    params = {name: count_parameters(candidate(name)) for name in names}  # a bad name fails before any timing
    rows = []
    for done, name in enumerate(names):
        events.progress("bench-training", done, len(names), model=name)
        fp32 = step_seconds(name, None, CPU.batch, CPU.crop, compiled=args.compile)
        low = step_seconds(name, dtype, CPU.batch, CPU.crop, compiled=args.compile) if dtype else None
        rows.append((name, params[name], fp32, low))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report_markdown(rows, args.command_line, args.threads, dtype, args.compile))
    events.artifact("report", str(args.out))
    events.emit("done", report=str(args.out),
                models={name: {"float32": fp32, "mixed": low} for name, _, fp32, low in rows})


def _run_stages(args: argparse.Namespace) -> None:
    if args.models or args.compile:
        raise events.UserError("--run times a run's own stages", "leave out --models and --compile with --run")
    run = RunDir.open(args.run)
    names = check_stages(args.stages.split(",")) if args.stages else list(STAGE_NAMES)
    ctx = build_context(run, pick_device("cpu"))
    rows = []
    for done, name in enumerate(names):
        events.progress("bench-training", done, len(names), training_stage=name)
        rows.append((name, *stage_step_seconds(ctx, name)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(stage_report_markdown(rows, run, args.command_line, args.threads))
    events.artifact("report", str(args.out))
    events.emit("done", report=str(args.out), stages={name: seconds for name, seconds, _, _ in rows})
