"""`road-sslkd bench-inference`: inference speed and memory on this machine, as a markdown table.

Model throughput: 512 x 512 tiles, batch 2, a fixed number of threads, best of a few runs, for the
``cpu`` preset's student (ONNX fp32, ONNX INT8, torch eager) and its two teachers (ONNX fp32).
Whole-raster prediction: ``predict_file`` in a child process per raster (1k, 5k, 20k px square, 3-band tiled
GeoTIFFs generated in strips), reporting wall time and the child's peak resident memory. Models have random
weights: speed and memory do not depend on them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window

from . import events
from .bench import machine
from .config import make_config
from .evaluate import onnx_throughput
from .export import export_onnx, onnx_metadata
from .models import build_model
from .quantize import quantize_int8

CPU = make_config("cpu")
STUDENT, TEACHERS = CPU.student, (CPU.teacher_a, CPU.teacher_b)
TILE, BATCH = 512, 2
RESOLUTION_CM = 50.0  # the generated rasters' and the models' resolution: nothing is resampled

# Runs in a fresh interpreter (no torch, no other model). Its peak is VmHWM, which starts afresh at exec;
# getrusage's ru_maxrss would not: Linux carries it over from the forking parent, this torch-laden process.
_CHILD = """
import json, sys, time
from pathlib import Path
from road_sslkd.onnx_runtime import load_model
from road_sslkd.predict import predict_file
model, raster, out, threads = sys.argv[1:]
start = time.perf_counter()
predict_file(load_model(model, "cpu", int(threads)), Path(raster), Path(out))
seconds = time.perf_counter() - start
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
peak = int(status["VmHWM"].split()[0]) / 1024
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak}))
"""


def write_test_raster(path: Path, size: int, strip: int = 1024) -> Path:
    """A size x size 3-band uint8 tiled GeoTIFF with a road grid, written strip by strip (bounded memory)."""
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
               "crs": "EPSG:3857", "transform": from_origin(0, 0, RESOLUTION_CM / 100, RESOLUTION_CM / 100),
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate", "zlevel": 1,
               "BIGTIFF": "IF_SAFER"}
    cols = np.arange(size)
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, strip):
            rows = np.arange(row, min(size, row + strip))[:, None]
            field = ((rows // 61 + cols // 47) % 5 * 40 + 40).astype(np.uint8)
            field[(rows % 400 < 12) | (cols % 400 < 12)] = 230  # a road every 200 m both ways
            window = Window(0, row, size, len(rows))
            dst.write(np.stack([field, field // 2 + 60, 255 - field]), window=window)
    return path


def torch_throughput(model: torch.nn.Module, threads: int, repeats: int = 3) -> float:
    """Megapixels per second of a torch model in eager mode on the CPU (best of ``repeats`` batches)."""
    torch.set_num_threads(threads)
    x = torch.randn(BATCH, 3, TILE, TILE)
    model.eval()
    with torch.inference_mode():
        model(x)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - start)
    return BATCH * TILE * TILE / best / 1e6


def _export(name: str, path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model(name, 3, "none")
    meta = onnx_metadata(model, [0.5] * 3, [0.25] * 3, TILE, 15, RESOLUTION_CM)
    return export_onnx(model, path, meta, overwrite=True), model


def predict_in_child(model: Path, raster: Path, out: Path, threads: int) -> dict:
    result = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(raster), str(out), str(threads)],
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"prediction of {raster} failed:\n{result.stderr[-3000:]}")
    out.unlink()
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_benchmark(work: Path, threads: int, sizes: list[int]) -> dict:
    """Every measurement of the report, as a dict (see ``report_markdown``)."""
    events.progress("bench-inference", 0, 3 + len(sizes), what="export")
    student_onnx, student = _export(STUDENT, work / "student.onnx")
    int8_onnx = quantize_int8(student_onnx, work / "student.int8.onnx")
    teachers = [(f"teacher {name}", "ONNX fp32", _export(name, work / f"{name}.onnx")[0]) for name in TEACHERS]
    events.progress("bench-inference", 1, 3 + len(sizes), what="throughput")
    eager = torch_throughput(student, threads)
    student_name = f"student {STUDENT}"
    onnx_models = [(student_name, "ONNX fp32", student_onnx), (student_name, "ONNX INT8", int8_onnx), *teachers]
    speeds = onnx_throughput([path for _, _, path in onnx_models], 3, TILE, BATCH, 3, threads)
    throughput = [(student_name, "torch eager", eager)] + [
        (name, runtime, speed) for (name, runtime, _), speed in zip(onnx_models, speeds)]
    rasters = []
    for step, size in enumerate(sizes, 2):
        events.progress("bench-inference", step, 3 + len(sizes), what=f"raster {size} px")
        raster = write_test_raster(work / f"raster_{size}.tif", size)
        for label, path in (("student fp32", student_onnx), ("student INT8", int8_onnx)):
            measured = predict_in_child(path, raster, work / "prediction.tif", threads)
            rasters.append({"size": size, "model": label, **measured,
                            "mpx_per_s": size * size / 1e6 / measured["seconds"]})
        raster.unlink()
    return {"throughput": throughput, "rasters": rasters}


def report_markdown(results: dict, command: str, threads: int) -> str:
    info = machine()
    eager = results["throughput"][0][2]
    lines = [
        "# Inference benchmark",
        "",
        f"{datetime.date.today().isoformat()}, {info['cpu']}, nproc {os.cpu_count()}, {threads} threads, "
        f"torch {info['torch']}, random weights. Load average at the end: {os.getloadavg()[0]:.1f} (other "
        "work on the machine slows every number alike).",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        f"## Model throughput ({TILE} x {TILE} tiles, batch {BATCH}, best of 3)",
        "",
        "| model | runtime | Mpx/s | vs torch eager |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {model} | {runtime} | {mpx:.2f} | {mpx / eager:.2f}x |"
              for model, runtime, mpx in results["throughput"]]
    lines += [
        "",
        "## Whole rasters (`predict_file`: streaming, overlap 15 %, GeoTIFF in and out)",
        "",
        f"3-band uint8 tiled GeoTIFFs at {RESOLUTION_CM:g} cm. Each row is a fresh process: seconds include "
        "loading the model, Mpx/s counts raster pixels (tiles overlap, so the model sees about 1.4x more), "
        "peak RSS is the process's maximum resident memory.",
        "",
        "| raster | model | seconds | Mpx/s | peak RSS (MB) |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {r['size']} x {r['size']} | {r['model']} | {r['seconds']:.1f} | {r['mpx_per_s']:.2f} | "
              f"{r['peak_rss_mb']:.0f} |" for r in results["rasters"]]
    return "\n".join(lines) + "\n"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench-inference", help="inference throughput and memory on this machine")
    p.add_argument("--out", type=Path, required=True, help="markdown file, e.g. docs/benchmarks/inference.md")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every runtime (default: 2)")
    p.add_argument("--sizes", default="1000,5000,20000",
                   help="square raster sizes in px, comma-separated (default: 1000,5000,20000)")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary folder; needs ~2 GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    if args.out.exists() and not args.overwrite:
        raise events.UserError(f"{args.out} exists", "pass --overwrite to replace the report")
    sizes = [int(s) for s in args.sizes.split(",")]
    command = args.command_line
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        results = run_benchmark(Path(work), args.threads, sizes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report_markdown(results, command, args.threads))
    events.artifact("report", str(args.out))
    events.emit("done", report=str(args.out), **results)
