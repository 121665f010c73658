"""The `gpu` preset's benchmark on a lent GPU machine, prepared here to fit its limits (docs/scale.md,
"A lent GPU machine").

That machine has PyTorch but neither rasterio nor segmentation-models-pytorch, reaches no network and no
../shared, takes at most 64 MiB per call and 15 minutes of device time per session (10 per command), and
goes back 30 s after a call. So the check is three steps, the last two run back to back:

    .venv-backend/bin/python scripts/gpu_check.py pack ../shared/data/cil_road_2016   # here
    python3 scripts/gpu_check.py setup   # there, carry .gpu_wheels: install them, record the card, smoke run
    python3 scripts/gpu_check.py bench   # there, carry .gpu_data: a timed pilot, then the benchmark that fits

``bench`` first runs the whole benchmark of one seed at a tiny length (the pilot), then the three seeds (or
the first alone, where three would get under --min-scale of the preset's length) at the longest length that
the pilot's timings say ends within the budget, and copies its report, figures and timings to $OUT. The
images travel as lossless WebP (a third smaller than PNG, checked pixel for pixel here) and are written
back as PNG there.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS, DATA, SITE = ROOT / ".gpu_wheels", ROOT / ".gpu_data", ROOT / ".gpu_site"
CARRY_LIMIT = 64 * 2**20
# What the machine lacks, at the versions the backend venv here runs (its image holds the rest, KINDS.md).
MISSING = ("rasterio", "affine", "segmentation-models-pytorch", "shapely")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
FIGURES = ("curves.png", "precision_recall.png", "examples.png")
# Run there with the installed wheels: every module a benchmark loads imports, and what the card offers.
CARD = """
import json, platform, torch, rasterio, segmentation_models_pytorch as smp
from road_sslkd import bench, export, pipeline
cuda = torch.cuda.is_available()
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "rasterio": rasterio.__version__, "smp": smp.__version__,
                  "gpu": torch.cuda.get_device_name() if cuda else None,
                  "bf16": torch.cuda.is_bf16_supported() if cuda else None}))
"""


def split_files(data: Path) -> tuple[list[str], list[str]]:
    """The split's (images, masks) as paths relative to ``data``; a ValueError for a path outside it."""
    split = json.loads((data / "split.json").read_text())
    images = [p["image"] for key in ("labelled", "test") for p in split.get(key, [])] + split.get("unlabelled", [])
    masks = [p["mask"] for key in ("labelled", "test") for p in split.get(key, [])]
    for rel in images + masks:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"{rel} in {data / 'split.json'} is not inside the dataset folder")
    return images, masks


def lossless_webp(path: Path) -> bytes | None:
    """``path`` as lossless WebP when it is an 8-bit RGB or grey PNG that WebP holds (at most 16383 px a side)
    and that round-trips exactly, else None."""
    import numpy as np
    from PIL import Image

    if path.suffix.lower() != ".png":
        return None
    with Image.open(path) as image:
        if image.mode not in ("RGB", "L") or max(image.size) > 16383:
            return None
        pixels = np.asarray(image)
        buffer = io.BytesIO()
        image.save(buffer, "WEBP", lossless=True, quality=80, method=4)
    with Image.open(io.BytesIO(buffer.getvalue())) as back:
        if not np.array_equal(np.asarray(back.convert(image.mode)), pixels):
            return None
    return buffer.getvalue()


def pack_dataset(data: Path, tar_path: Path) -> None:
    """The dataset's split.json, masks and images (PNG as lossless WebP) in one uncompressed tar."""
    images, masks = split_files(data)
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "w") as tar:
        tar.add(data / "split.json", "split.json")
        for rel in sorted(set(images)):
            webp = lossless_webp(data / rel)
            if webp is None:
                tar.add(data / rel, rel)
                continue
            info = tarfile.TarInfo(rel + ".webp")
            info.size = len(webp)
            tar.addfile(info, io.BytesIO(webp))
        for rel in sorted(set(masks)):
            tar.add(data / rel, rel)


def unpack_dataset(tar_path: Path, dest: Path) -> Path:
    """The dataset of ``pack_dataset`` in ``dest``, every WebP written back as the PNG it came from."""
    from PIL import Image

    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    for webp in dest.rglob("*.png.webp"):
        with Image.open(webp) as image:
            image.save(webp.with_suffix(""), "PNG")
        webp.unlink()
    return dest


def travelling_bytes(carried: Path) -> int:
    """What a call that carries ``carried`` sends: the tracked and untracked, not ignored files, and it."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    tree = sum((ROOT / name).stat().st_size for name in listed if name and (ROOT / name).is_file())
    return tree + sum(p.stat().st_size for p in carried.rglob("*") if p.is_file())


def pack(args: argparse.Namespace) -> None:
    shutil.rmtree(WHEELS, ignore_errors=True)
    platforms = [flag for name in PLATFORMS for flag in ("--platform", name)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", args.python, "--implementation", "cp", *platforms, "-d", str(WHEELS),
                    *(f"{name}=={version(name)}" for name in MISSING)], check=True)
    shutil.rmtree(DATA, ignore_errors=True)
    pack_dataset(args.data, DATA / f"{args.data.resolve().name}.tar")  # the name the report gives the dataset
    for carried, call in ((WHEELS, "setup"), (DATA, "bench")):
        size = travelling_bytes(carried)
        print(f"{call}: {size / 2**20:.1f} MiB travel with carry {carried.name}")
        if size > CARRY_LIMIT:
            sys.exit(f"over the {CARRY_LIMIT // 2**20} MiB a call may carry: leave out files or split the call")


def backend_env() -> dict[str, str]:
    """The environment in which ``python -m road_sslkd.cli`` finds the backend and the installed wheels."""
    path = os.pathsep.join(filter(None, [str(ROOT / "backend" / "src"), str(SITE), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def out_dir(work: Path) -> Path:
    out = Path(os.environ.get("OUT") or work / "out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def install_wheels() -> None:
    """The carried wheels into SITE, unless what they provide imports already (here, or after setup there)."""
    probe = [sys.executable, "-c", "import rasterio, segmentation_models_pytorch, shapely"]
    if subprocess.run(probe, env=backend_env(), capture_output=True).returncode == 0:
        return
    wheels = sorted(map(str, WHEELS.glob("*.whl")))
    if not wheels:
        sys.exit(f"rasterio or segmentation-models-pytorch is missing and {WHEELS.name} was not carried: run "
                 "setup with carry .gpu_wheels first, and bench within the 30 s the machine stays warm")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels], check=True)


def cli(work: Path, *args: str) -> None:
    """``road-sslkd ARGS`` with the backend and the wheels; its events and log in ``work``/cli.log."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "cli.log", "a") as log:
        code = subprocess.run([sys.executable, "-m", "road_sslkd.cli", *args], env=backend_env(), stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if code != 0:
        sys.exit(f"road-sslkd {' '.join(args)} failed (exit {code}): see {work / 'cli.log'}\n"
                 + "".join((work / "cli.log").read_text().splitlines(keepends=True)[-20:]))


def install_backend() -> None:
    """The wheels installed and the backend importable here, as in the ``road-sslkd`` processes."""
    install_wheels()
    sys.path[:0] = [str(ROOT / "backend" / "src"), str(SITE)]


def setup(args: argparse.Namespace) -> None:
    install_backend()
    from road_sslkd.config import STAGE_NAMES

    machine = json.loads(subprocess.run([sys.executable, "-c", CARD], env=backend_env(), check=True,
                                        capture_output=True, text=True).stdout)
    # Every stage of the tiny preset on synthetic scenes: the device's code paths (mixed precision, its loss
    # scaling, channels-last, export), in seconds, before a long call depends on them.
    start, smoke = time.monotonic(), args.work / "smoke"
    shutil.rmtree(smoke, ignore_errors=True)
    cli(args.work, "demo-data", str(smoke / "data"), "--labelled", "2", "--unlabelled", "2", "--test", "1",
        "--size", "96")
    cli(args.work, "train", "--data", str(smoke / "data"), "--preset", "tiny", "--device", args.device,
        "--out", str(smoke / "run"), "--stages", ",".join(STAGE_NAMES))
    machine["smoke_s"] = round(time.monotonic() - start, 1)
    print(json.dumps(machine))
    (out_dir(args.work) / "machine.json").write_text(json.dumps(machine, indent=1) + "\n")


def fit_scale(pilot_wall: float, pilot_train: float, pilot_scale: float, budget: float, seeds: int) -> float | None:
    """The largest steps scale (two significant digits, rounded down, at most 1) at which ``seeds`` seeds
    should end within ``budget`` seconds, from a one-seed pilot that took ``pilot_wall`` seconds of which
    ``pilot_train`` trained its stages at ``pilot_scale``. Each seed is taken to cost the pilot's wall time
    plus its training scaled with the steps, and seeds sharing the GPU not to overlap: a bound, since they
    do. None when not even twice the pilot's steps fit."""
    ratio = 1 + (budget / seeds - pilot_wall) / max(pilot_train, 1e-9)
    if ratio < 2:
        return None
    scale = min(1.0, pilot_scale * ratio)
    step = 10 ** (math.floor(math.log10(scale)) - 1)
    return min(1.0, math.floor(scale / step + 1e-9) * step)


def run_bench(args: argparse.Namespace, name: str, scale: float, seeds: str, timeout: float) -> tuple[dict, float]:
    """``road-sslkd bench`` from scratch at ``scale`` into ``name`` under --work, stopped (every seed
    checkpoints) after ``timeout`` seconds; its report.json and wall seconds."""
    from road_sslkd.config import make_config

    preset = make_config(args.preset)
    # --steps-scale shortens the stages only: keep the preset's warm-up share, curve points and checkpoints.
    cadence = max(5, round(preset.val_every * scale))
    shorter = {"warmup": max(1, round(preset.warmup * scale)), "val_every": cadence, "checkpoint_every": cadence}
    shutil.rmtree(args.work / f"{name}-runs", ignore_errors=True)  # bench resumes what it finds: time a fresh run
    config = args.work / f"{name}-config.json"
    config.write_text(json.dumps(shorter))
    command = [sys.executable, "-m", "road_sslkd.cli", "bench", "--data", str(args.dataset), "--preset", args.preset,
               "--device", args.device, "--weights", "none", "--steps-scale", f"{scale:g}", "--config", str(config),
               "--seeds", seeds, "--jobs", str(len(seeds.split(","))), "--work", str(args.work / f"{name}-runs"),
               "--out", str(args.work / name), "--overwrite"]
    print("$", " ".join(command), flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(command, env=backend_env())
    try:
        proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        sys.exit(f"{name} did not end within its {timeout:.0f} s: stopped (its seeds resume with the same command)")
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode})")
    return json.loads((args.work / name / "report.json").read_text()), time.monotonic() - start


def bench(args: argparse.Namespace) -> None:
    start = time.monotonic()
    install_backend()
    from road_sslkd.bench import SHARED_STAGE

    out = out_dir(args.work)
    tars = [args.tar] if args.tar else sorted(DATA.glob("*.tar"))
    if len(tars) != 1:
        sys.exit(f"{len(tars)} packed datasets in {DATA.name}: pass --tar")
    args.dataset = args.work / tars[0].stem
    shutil.rmtree(args.dataset, ignore_errors=True)
    unpack_dataset(tars[0], args.dataset)
    pilot, pilot_wall = run_bench(args, "pilot", args.pilot_scale, "0", args.budget)
    # Training steps alone scale with the length; caching the teachers' outputs, evaluation and export do not.
    pilot_train = sum(m["train_seconds"] for name, m in pilot["models"].items() if name != SHARED_STAGE)
    left = args.budget - (time.monotonic() - start)
    seeds = args.seeds.split(",")
    scale = fit_scale(pilot_wall, pilot_train, args.pilot_scale, left, len(seeds))
    if (scale is None or scale < args.min_scale) and len(seeds) > 1:  # one seed trained longer says more
        seeds = seeds[:1]
        scale = fit_scale(pilot_wall, pilot_train, args.pilot_scale, left, 1)
    fit = {"pilot_scale": args.pilot_scale, "pilot_wall_s": round(pilot_wall, 1),
           "pilot_train_s": round(pilot_train, 1), "budget_left_s": round(left), "scale": scale, "seeds": seeds,
           "full_length_train_s_per_seed": round(pilot_train / args.pilot_scale),
           "machine": pilot["machine"], "pilot_models": pilot["models"]}
    (out / "fit.json").write_text(json.dumps(fit, indent=1) + "\n")
    print(json.dumps({k: v for k, v in fit.items() if k != "pilot_models"}), flush=True)
    if scale is None:
        sys.exit("not even twice the pilot's length fits the budget: fit.json holds the pilot's timings")
    run_bench(args, "report", scale, ",".join(seeds), args.budget - (time.monotonic() - start) - args.margin)
    for name in ("report.md", "report.json", *FIGURES):
        shutil.copy2(args.work / "report" / name, out / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("pack", help="here: the wheels and the dataset a lent GPU machine lacks")
    p.add_argument("data", type=Path, help="dataset folder with split.json, e.g. ../shared/data/cil_road_2016")
    p.add_argument("--python", default="3.12", help="the machine's Python version, for its wheels")
    p.set_defaults(func=pack)
    a = sub.add_parser("setup", help="there: install the wheels, record the card, train the tiny preset on it")
    a.add_argument("--device", default="cuda", help="default cuda")
    a.set_defaults(func=setup)
    b = sub.add_parser("bench", help="there: a timed pilot, then the benchmark that fits the budget")
    b.add_argument("--budget", type=float, default=540, help="seconds for the pilot and the benchmark (default 540)")
    b.add_argument("--margin", type=float, default=20, help="seconds kept for the report's copy (default 20)")
    b.add_argument("--pilot-scale", type=float, default=0.005, help="the pilot's steps scale (default 0.005)")
    b.add_argument("--seeds", default="0,1,2", help="the benchmark's seeds, trained side by side (default 0,1,2)")
    b.add_argument("--min-scale", type=float, default=0.05,
                   help="below this steps scale for all the seeds, train the first seed alone (default 0.05)")
    b.add_argument("--preset", default="gpu", help="default gpu")
    b.add_argument("--device", default="cuda", help="default cuda")
    b.add_argument("--tar", type=Path, help=f"the packed dataset (default: the one in {DATA.name})")
    b.set_defaults(func=bench)
    for step in (a, b):
        step.add_argument("--work", type=Path, default=ROOT / "runs" / "gpu-check",
                          help="folder for the data, runs and logs (default runs/gpu-check); $OUT or WORK/out "
                          "receives the results")
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
