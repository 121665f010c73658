"""`road-sslkd bench`: every student and teacher of DESIGN.md's comparison, trained on one split with one
budget per seed, evaluated on the whole test rasters, summarised in report.json and report.md.

Each seed is an ordinary run folder under ``--work`` and is resumed when the benchmark is started again.
With ``--jobs N`` the seeds train in N child processes (``road-sslkd train --resume``) that share the CPU
cores: on a CPU, one single-threaded process per core trains faster than one process on every core.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import __version__, events
from .config import PRETRAIN, STAGE_NAMES, Config
from .data import DatasetSpec
from .evaluate import onnx_throughput
from .export import export_run_model
from .pipeline import QUALITY_KEYS, add_config_arguments, config_from_args, metrics_table, train
from .precision import CPU_BF16_ENV, cpu_bf16_pays, cpu_flags
from .pretrain import pretrain
from .runs import RunDir, install_stop_handlers, stop_requested

FIGURES = ("curves.png", "precision_recall.png", "examples.png")  # written next to report.md
REPORT_MODELS = ("student_supervised", "student_ssl", "teacher_a", "teacher_b", "teacher_a_ssl", "teacher_b_ssl",
                 "student_kd", "student_sslkd")
SHARED_STAGE = "teacher_b_ssl"  # trained in one stage with teacher_a_ssl, whose seconds it repeats


def training_minutes(models: dict[str, dict]) -> float:
    """Setup and train minutes of one seed's stages. Unlike a start's wall time, these add up over the
    starts of a resumed run (a checkpoint keeps the seconds spent before it)."""
    return sum(m.get("setup_seconds", 0.0) + m.get("train_seconds", 0.0)
               for name, m in models.items() if name in REPORT_MODELS and name != SHARED_STAGE) / 60


def aggregate(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """Mean over seeds of every metric, plus the spread (population std) of each quality metric."""
    models = {}
    for name in REPORT_MODELS:
        runs = [m[name] for m in per_seed if name in m]
        if not runs:
            continue
        entry = {}
        for key in runs[0]:
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                entry[key] = float(np.mean(values))
                if key in QUALITY_KEYS:
                    entry[f"{key}_std"] = float(np.std(values))
        entry["iou_seeds"] = [r.get("iou") for r in runs]
        models[name] = entry
    return models


def machine() -> dict[str, object]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # Two CPUs of one name can differ in the instructions that set training and inference speed
    # (bfloat16 training, VNNI for INT8), so the name carries them.
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    if simd:
        cpu = f"{cpu} ({', '.join(simd)})"
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__}


def run_bench(data: Path, cfg: Config, seeds: list[int], work: Path, device: str,
              command: str, jobs: int = 1) -> tuple[dict, list[float], RunDir]:
    """Train and evaluate every model for every seed; returns the aggregated metrics, each seed's training
    minutes and the first run."""
    spec = DatasetSpec.from_split(data)
    if not spec.test:
        raise events.UserError(f"{data}/split.json has no 'test' pairs", "the benchmark evaluates on the test split")
    runs = []
    for seed in seeds:
        path = work / f"seed_{seed}"
        if (path / "config.json").exists():
            run = RunDir.open(path)
            # A seed folder is resumed only where it was started the same way: another dataset or settings
            # would put its old numbers in this report.
            other = ("settings" if run.config.to_json() != {**cfg.to_json(), "seed": seed}
                     else "data" if _resolved(run.dataset.to_json()) != _resolved(spec.to_json()) else "")
            if other:
                raise events.UserError(f"{path} holds a run with other {other}",
                                       f"delete {path} or pass another --work folder")
            run.require_unchanged_images()
        else:
            run = RunDir.create(path, Config(**{**cfg.to_json(), "seed": seed}), spec)
        runs.append(run)
    in_children = jobs > 1 and len(runs) > 1
    if in_children:
        train_in_children([run.path for run in runs], jobs, device)
    per_seed = []
    for seed, run in zip(seeds, runs):
        events.log.info("benchmark seed %d in %s", seed, run.path)
        # After the children, this only collects: every stage and evaluation is found finished.
        per_seed.append(train(run, device, command, export=not in_children)["models"])
    first_run = runs[0]
    models = aggregate(per_seed)
    with tempfile.TemporaryDirectory() as tmp:  # throughput of every model as an ONNX on this CPU
        paths = [export_run_model(first_run, name, Path(tmp) / f"{name}.onnx") for name in models]
        for name, speed in zip(models, onnx_throughput(paths, len(cfg.bands), size=cfg.tile)):
            models[name]["mpx_per_s"] = speed
    return models, [round(training_minutes(m), 1) for m in per_seed], first_run


def _resolved(dataset: dict) -> dict:
    """A dataset's JSON with each path resolved (``../data`` and ``/abs/data`` name the same files)."""
    def resolve(value: object) -> object:
        if isinstance(value, str):
            return str(Path(value).resolve())
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return {k: resolve(v) for k, v in value.items()} if isinstance(value, dict) else value

    return resolve(dataset)


def train_in_children(paths: list[Path], jobs: int, device: str) -> None:
    """``road-sslkd train --resume`` for each run folder, ``jobs`` at a time, the cores split between them;
    each child's events and log go to ``train.jsonl`` and ``train.log`` in its folder."""
    threads = str(max(1, (os.cpu_count() or 1) // min(jobs, len(paths))))
    # Probed once here, not by each child at its start, where the others' load could tip the probe and give
    # the seeds different numerics.
    bf16 = "1" if cpu_bf16_pays() else "0"
    events.log.info("on the CPU every seed trains in %s", "bfloat16" if bf16 == "1" else "float32")
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, CPU_BF16_ENV: bf16}
    pending, running, done = list(paths), {}, 0
    try:
        while pending or running:
            while pending and len(running) < jobs:
                path = pending.pop(0)
                events.log.info("benchmark run %s starts in a child process (%s threads; log: %s)", path, threads,
                                path / "train.log")
                with open(path / "train.jsonl", "a") as out, open(path / "train.log", "a") as log:
                    running[path] = subprocess.Popen(
                        [sys.executable, "-m", "road_sslkd.cli", "train", "--resume", str(path), "--device", device],
                        stdout=out, stderr=log, stdin=subprocess.DEVNULL, env=env)
            if stop_requested():
                raise events.Cancelled("benchmark stopped", "run the same command again: every seed resumes")
            time.sleep(1)
            for path, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[path]
                if proc.returncode != 0:  # a child's failure is not the user's input: exit code 1, like a crash
                    raise RuntimeError(f"training {path} failed (exit {proc.returncode}); see {path / 'train.log'} "
                                       "(the same command resumes every seed)")
                done += 1
                events.progress("bench", done, len(paths), run=str(path))
    finally:
        for proc in running.values():  # SIGTERM: each child checkpoints and exits
            proc.send_signal(signal.SIGTERM)
        for proc in running.values():
            proc.wait()


def figures(run: RunDir, names: list[str], out: Path, examples: int = 3) -> list[Path]:
    """Training curves, precision-recall curves and test overlays of one run, as PNGs in ``out``.

    Everything comes from what the run's evaluation kept (RunDir.save_evaluation): nothing is predicted again.
    """
    import rasterio

    from .data import LabelledSet
    from .plots import plot_curves, plot_examples, plot_pr

    cfg = run.config
    items = LabelledSet(run.dataset.test[:examples], cfg.bands, cfg.label_width).items
    truths = [label.read(0, 0, r.height, r.width) == 1 for r, label in items]
    pr, shown = {}, {}
    thresholds = {name: run.metrics()["models"][name].get("threshold", 0.5) for name in names}
    for name in names:
        pr[name], probs = run.load_evaluation(name)
        if name.startswith("student"):
            shown[name] = probs[:examples]
    rgbs = []
    for pair in run.dataset.test[:examples]:
        with rasterio.open(pair.image) as ds:
            rgbs.append(np.moveaxis(ds.read([1, 2, 3] if ds.count >= 3 else [1, 1, 1]), 0, -1))
    curves = run.curves()
    metric = "val_iou" if any("val_iou" in c for c in curves.values()) else "fit_iou"
    return [
        plot_curves(curves, metric, out / FIGURES[0]),
        plot_pr(pr, thresholds, out / FIGURES[1]),
        plot_examples(rgbs, [t[: r.shape[0], : r.shape[1]] for t, r in zip(truths, rgbs)], shown,
                      thresholds, out / FIGURES[2]),
    ]


def report_markdown(report: dict) -> str:
    m = report["models"]
    lines = [
        f"# Benchmark: {report['dataset']} ({report['preset']} preset)",
        "",
        f"Seeds {report['seeds']}, road-sslkd {report['version']}, {report['date']}, "
        f"{report['machine']['cpu']} ({report['machine']['cores']} cores), GPU: {report['machine']['gpu']}.",
        "",
        "Road-class metrics on the whole test rasters (percent, mean ± std over seeds), each model at the "
        "threshold it ships with (0.5, or with align_decision the prior alignment of its output on the unlabelled "
        "pool, docs/method.md; IoU @0.5 for comparison); relaxed F1 counts a hit "
        "within 3 px; Mpx/s is onnxruntime on this CPU (all threads, 2 tiles per batch); setup and train seconds "
        "per stage (setup: caching the teachers' outputs; teacher_*_ssl share one stage).",
        "",
        metrics_table(m),
        "",
        "Command:",
        "",
        f"    {report['command']}",
        "",
        f"It ran for {report['wall_seconds'] / 60:.0f} min wall (stages an earlier run had finished in its work "
        "folder are reused, not counted). Training per seed (setup and train time of its stages, over every "
        "start of a resumed run; evaluation not included): "
        + ", ".join(f"seed {s} {t:.0f} min" for s, t in zip(report["seeds"], report["training_minutes"]))
        + f", with {report['jobs']} seed(s) at a time.",
        "",
    ]
    if report.get("pretraining"):
        p = report["pretraining"]
        lines += [f"Every network started from encoders pretrained on the labelled and unlabelled images by masked "
                  f"inpainting ({p['steps']} steps per encoder, {p['minutes']:.0f} min, part of the wall time only "
                  f"if this start ran them; they were made by `{p['command']}`).", ""]
    if len(report["seeds"]) > 1:
        lines += ["Road IoU per seed:", "", "| Model | " + " | ".join(f"seed {s}" for s in report["seeds"]) + " |",
                  "|---|" + "---:|" * len(report["seeds"])]
        lines += [f"| {name} | " + " | ".join("" if v is None else f"{100 * v:.1f}" for v in values["iou_seeds"])
                  + " |" for name, values in m.items() if "iou_seeds" in values]
        lines += [""]
    lines += [f"![{name}]({name})" for name in report.get("figures", [])] + [""]
    lines += claims(m)
    return "\n".join(lines)


def claims(m: dict[str, dict]) -> list[str]:
    """The SSLKD student against the project's targets (docs/method.md), as checked lines of the report."""
    needed = ("student_sslkd", "student_ssl", "student_supervised", "teacher_a_ssl", "teacher_b_ssl")
    if not all(name in m for name in needed):
        return []
    s = m["student_sslkd"]
    best = max(("teacher_a_ssl", "teacher_b_ssl"), key=lambda name: m[name]["iou"])
    t = m[best]
    gap_ssl = 100 * (s["iou"] - m["student_ssl"]["iou"])
    spread = 100 * max(s.get("iou_std", 0.0), m["student_ssl"].get("iou_std", 0.0))
    # One seed measures no spread, so the spread rule cannot be met.
    several = len(s.get("iou_seeds", [])) > 1
    spread_note = f"largest seed spread {spread:.1f}" if several else "one seed: spread not measured"
    gap_sup = 100 * (s["iou"] - m["student_supervised"]["iou"])
    ratio = s["iou"] / max(t["iou"], 1e-9)

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    rows = [
        ("SSLKD − traditional semi-supervised (UniMatch-style) student", f"{gap_ssl:+.1f} IoU points "
         f"({spread_note})", "≥ +3 and > 2 × spread", several and gap_ssl >= 3 and gap_ssl > 2 * spread),
        ("SSLKD − supervised student", f"{gap_sup:+.1f} IoU points", "≥ +8", gap_sup >= 8),
        (f"SSLKD / better semi-supervised teacher ({best})", f"{100 * ratio:.0f} % of its IoU", "≥ 95 %",
         ratio >= 0.95),
        ("parameters, student / teacher", f"{s['params'] / t['params']:.2f}", "≤ 0.2",
         s["params"] <= 0.2 * t["params"]),
    ]
    if s.get("mpx_per_s") and t.get("mpx_per_s"):
        speed = s["mpx_per_s"] / t["mpx_per_s"]
        rows.append(("CPU throughput, student / teacher", f"{speed:.1f}x", "≥ 4x", speed >= 4))
    lines = ["## The SSLKD student against its targets", "", "| Claim | Measured | Target | |", "|---|---|---|---|"]
    lines += [f"| {claim} | {value} | {target} | {mark(ok)} |" for claim, value, target, ok in rows]
    return lines + [""]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="compare students and teachers on a dataset (report.json, report.md)")
    p.add_argument("--data", type=Path, required=True, help="dataset folder with split.json (needs 'test')")
    p.add_argument("--out", type=Path, required=True, help="folder for report.json and report.md")
    p.add_argument("--work", type=Path, help="folder for the runs (default: runs/bench-DATASET-PRESET)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--pretrain", action="store_true",
                   help="start every network from encoders pretrained on the split's labelled and unlabelled "
                   "images (road-sslkd pretrain's defaults), kept in WORK/pretrained")
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds trained at once in child processes, the CPU cores split between them (default 1)")
    add_config_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    start = time.monotonic()
    install_stop_handlers()
    report_json = args.out / "report.json"
    written = [report_json, args.out / "report.md", *(args.out / name for name in FIGURES)]
    existing = [path for path in written if path.exists()]
    if existing and not args.overwrite:
        raise events.UserError(f"{existing[0]} exists", "pass --overwrite to replace the report and its figures "
                               "(the seeds' runs in --work are resumed, not retrained), or choose another --out")
    if args.seed is not None:  # add_config_arguments offers it, but every benchmark seed comes from --seeds
        raise events.UserError("bench takes its seeds from --seeds, not --seed", f"pass --seeds {args.seed}")
    if args.weights == PRETRAIN:
        raise events.UserError("bench pretrains once, for every seed, with --pretrain", "pass --pretrain instead")
    if args.pretrain:
        if args.weights is not None:
            raise events.UserError("--pretrain and --weights both set the networks' first weights", "pass one")
        args.weights = "none"  # the pretraining's own start; every network then starts from its folder
    cfg = config_from_args(args, stages=list(STAGE_NAMES))
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as exc:
        raise events.UserError(f"--seeds {args.seeds} is not a list of whole numbers", "e.g. --seeds 0,1,2") from exc
    if len(set(seeds)) != len(seeds):  # a repeated seed would count one run twice and shrink the spread
        raise events.UserError(f"--seeds {args.seeds} repeats a seed", "give each seed once, e.g. --seeds 0,1,2")
    dataset = args.data.resolve().name
    work = args.work or Path("runs") / f"bench-{dataset}-{cfg.preset}"
    if args.jobs < 1:
        raise events.UserError(f"--jobs {args.jobs}", "give 1 or more processes")
    pretraining = None
    if args.pretrain:
        folder = (work / "pretrained").resolve()
        record = pretrain(DatasetSpec.from_split(args.data), cfg, folder, command=args.command_line)
        pretraining = {"command": record["command"], "steps": record["settings"]["steps"],
                       "minutes": round(sum(e["seconds"] for e in record["encoders"].values()) / 60, 1)}
        cfg = replace(cfg, weights=str(folder))
    try:
        models, minutes, first_run = run_bench(args.data, cfg, seeds, work, cfg.device, args.command_line, args.jobs)
    except events.Cancelled as exc:  # also raised by a seed trained in this process
        raise events.Cancelled(str(exc), "run the same command again: every seed resumes") from exc
    args.out.mkdir(parents=True, exist_ok=True)
    pictures = figures(first_run, [n for n in REPORT_MODELS if n in models], args.out)
    report = {
        "dataset": dataset, "preset": cfg.preset, "seeds": seeds,
        "command": args.command_line,
        "version": __version__, "date": datetime.date.today().isoformat(), "machine": machine(),
        "config": cfg.to_json(), "models": models, "figures": [p.name for p in pictures],
        "wall_seconds": round(time.monotonic() - start), "training_minutes": minutes, "jobs": args.jobs,
        "pretraining": pretraining,
    }
    report_json.write_text(json.dumps(report, indent=2))
    (args.out / "report.md").write_text(report_markdown(report))
    events.artifact("report", args.out / "report.md")
    events.emit("done", report=str(report_json), models=models)
