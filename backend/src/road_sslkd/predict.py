"""`road-sslkd predict`: road probability GeoTIFFs and centreline GeoPackages for whole rasters.

Rasters stream through ``onnx_runtime`` in strips (rasterio reads and writes), at the model's ground
resolution: a raster with another resolution is read through a warped VRT at the model's resolution and
the result warped back onto the raster's own grid. Outputs are written under a temporary name and renamed
when complete, so an interrupted run never leaves a file that looks finished. With ``--workers N``, N
worker processes predict one raster each at a time; the parent reports their events.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import tempfile
import time
import warnings
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import rasterio
import shapely
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window
from skimage.morphology import skeletonize

from . import events
from .events import UserError
from .onnx_runtime import PROVIDERS, RESAMPLE_TOLERANCE, ModelInfo, OnnxSegmenter, load_model, metres_per_degree

PROBABILITY_SUFFIX = "_road_prob.tif"
CENTRELINES_SUFFIX = "_centrelines.gpkg"
STRIP_ROWS = 1024  # rows per strip where this module copies or vectorises rasters itself
SPUR_PX_WITHOUT_CRS = 20.0
GDAL_OPTIONS = {
    "GDAL_CACHEMAX": 128,  # MB. Strips need little; the default (5 % of RAM) would let memory grow with the raster
    "GDAL_TIFF_INTERNAL_MASK": True,  # a .msk sidecar would not follow the rename of the finished output
}
GTIFF = {"driver": "GTiff", "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate",
         "predictor": 2, "BIGTIFF": "IF_SAFER"}


def _open(path: Path) -> rasterio.DatasetReader:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # pixel space is supported on purpose
            return rasterio.open(path)
    except RasterioIOError as exc:
        hint = "check the path and that it is a raster GDAL reads (GeoTIFF, PNG, JPEG...)"
        raise UserError(f"cannot read raster {path}: {exc}", hint=hint) from exc


def ground_resolution_m(dataset: rasterio.DatasetReader) -> Optional[tuple[float, float]]:
    """Pixel width and height on the ground in metres; None for a raster without CRS."""
    if dataset.crs is None:
        return None
    xres, yres = abs(dataset.transform.a), abs(dataset.transform.e)  # rotated rasters are rare in imagery
    if dataset.crs.is_geographic:
        x_metres, y_metres = metres_per_degree(dataset.xy(dataset.height / 2, dataset.width / 2)[1])
        return xres * x_metres, yres * y_metres
    factor = dataset.crs.linear_units_factor[1]
    return xres * factor, yres * factor


def _grid(dataset: rasterio.DatasetReader) -> dict:
    """The keyword arguments that put a new raster on ``dataset``'s grid."""
    return {"crs": dataset.crs, "transform": dataset.transform, "width": dataset.width,
            "height": dataset.height}


def _model_grid(dataset: rasterio.DatasetReader, resolution_cm: Optional[float]) -> Optional[dict]:
    """The model-resolution grid covering the raster, or None when the raster can be used as it is."""
    ground = ground_resolution_m(dataset)
    if ground is None or not resolution_cm:
        return None
    scale = [resolution_cm / 100 / size for size in ground]  # raster pixels per model pixel
    if all(abs(s - 1) <= RESAMPLE_TOLERANCE for s in scale):
        return None
    width = max(1, round(dataset.width / scale[0]))
    height = max(1, round(dataset.height / scale[1]))
    a, b, c, d, e, f = dataset.transform[:6]
    sx, sy = dataset.width / width, dataset.height / height
    transform = rasterio.Affine(a * sx, b * sy, c, d * sx, e * sy, f)  # same origin, coarser pixels
    return {**_grid(dataset), "transform": transform, "width": width, "height": height}


def _grid_warning(dataset: rasterio.DatasetReader, raster: Path, info: ModelInfo) -> Optional[str]:
    """Why ``raster`` may segment poorly or slowly: no pixel grid on the map, or a ground resolution far from the
    model's."""
    if dataset.transform.is_identity and (dataset.gcps[0] or dataset.rpcs):
        return (f"{raster} is georeferenced by control points (GCPs or RPCs), not by a grid: its output will have "
                "no georeferencing; warp it onto a grid first (gdalwarp -t_srs EPSG:CODE IN.tif OUT.tif)")
    ground = ground_resolution_m(dataset)
    return None if ground is None else info.resolution_warning(max(ground), dataset.width * dataset.height, str(raster))


def _has_nodata(dataset: rasterio.DatasetReader, bands: list[int]) -> bool:
    return any(MaskFlags.all_valid not in dataset.mask_flag_enums[b - 1] for b in bands)


class RasterioSource:
    """``RasterSource`` over a rasterio dataset (or warped VRT): the chosen bands, masked where nodata."""

    def __init__(self, dataset: rasterio.DatasetReader, bands: list[int]) -> None:
        self.dataset, self.bands = dataset, bands
        self.height, self.width = dataset.height, dataset.width
        self.masked = _has_nodata(dataset, bands)

    def read(self, row_off: int, rows: int) -> np.ndarray:
        return self.dataset.read(self.bands, window=Window(0, row_off, self.width, rows), masked=self.masked)


class RasterioSink:
    """``ProbabilitySink`` into band 1 of a rasterio dataset, with a per-dataset mask where nodata."""

    def __init__(self, dataset: rasterio.io.DatasetWriter, with_mask: bool) -> None:
        self.dataset, self.with_mask = dataset, with_mask

    def write(self, row_off: int, probability: np.ndarray, valid: Optional[np.ndarray]) -> None:
        window = Window(0, row_off, self.dataset.width, len(probability))
        self.dataset.write(probability, 1, window=window)
        if self.with_mask and valid is not None:
            self.dataset.write_mask(np.where(valid, 255, 0).astype(np.uint8), window=window)


def _probability_profile(grid: dict) -> dict:
    return {**GTIFF, "dtype": "uint8", "count": 1, **grid}


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.stem}.partial{path.suffix}")  # GDAL drivers like their own suffix


def predict_file(
    model: OnnxSegmenter,
    raster: Path,
    out_path: Path,
    bands: Optional[list[int]] = None,
    batch: int = 4,
    progress: Optional[Callable[[int, int], None]] = None,
    cancelled: Optional[Callable[[], bool]] = None,
    tta: bool = False,
) -> bool:
    """Write the road probability GeoTIFF of ``raster`` (uint8 0-255, the raster's grid); False if cancelled.

    ``bands``: None reads the model's default (``ModelInfo.default_bands``). Nodata (in every chosen band)
    becomes the output's per-dataset mask: every value 0-255 stays a probability, and QGIS shows masked
    pixels as transparent. ``tta``: the mean over 8 flips and rotations.
    """
    partial = _partial(out_path)
    with _open(raster) as src, rasterio.Env(**GDAL_OPTIONS):
        bands = bands or model.info.default_bands(src.count)
        _check_bands(src, raster, bands, model.info.bands)
        model_grid = _model_grid(src, model.info.resolution_cm)
        try:
            if model_grid is None:
                with rasterio.open(partial, "w", **_probability_profile(_grid(src))) as dst:
                    sink = RasterioSink(dst, _has_nodata(src, bands))
                    source = RasterioSource(src, bands)
                    finished = model.predict_raster(source, sink, batch, progress, cancelled, tta)
            else:
                finished = _predict_resampled(model, src, bands, model_grid, partial, batch, progress,
                                              cancelled, tta)
            if finished:
                os.replace(partial, out_path)
        finally:
            partial.unlink(missing_ok=True)
    return finished


def _predict_resampled(
    model: OnnxSegmenter,
    src: rasterio.DatasetReader,
    bands: list[int],
    grid: dict,
    partial: Path,
    batch: int,
    progress: Optional[Callable[[int, int], None]],
    cancelled: Optional[Callable[[], bool]],
    tta: bool,
) -> bool:
    """Predict on the model's grid into a scratch file beside the output, then warp it onto ``src``'s grid."""
    with tempfile.TemporaryDirectory(dir=partial.parent, prefix=".road-sslkd-") as scratch:
        model_grid = Path(scratch) / "model_grid.tif"
        with WarpedVRT(src, resampling=Resampling.bilinear, **grid) as vrt:
            with rasterio.open(model_grid, "w", **_probability_profile(grid)) as dst:
                source, sink = RasterioSource(vrt, bands), RasterioSink(dst, False)
                if not model.predict_raster(source, sink, batch, progress, cancelled, tta):
                    return False
        masked = _has_nodata(src, bands)
        with rasterio.open(model_grid) as predicted, rasterio.open(
            partial, "w", **_probability_profile(_grid(src))
        ) as dst, WarpedVRT(predicted, resampling=Resampling.bilinear, **_grid(src)) as back:
            sink = RasterioSink(dst, masked)
            for row in range(0, src.height, STRIP_ROWS):
                window = Window(0, row, src.width, min(STRIP_ROWS, src.height - row))
                probability = back.read(1, window=window)
                valid = src.read_masks(bands, window=window).any(axis=0) if masked else None
                if valid is not None:
                    probability[~valid] = 0
                sink.write(row, probability, valid)
    return True


def _check_bands(src: rasterio.DatasetReader, raster: Path, bands: list[int], needed: int) -> None:
    if max(bands) > src.count:
        raise UserError(
            f"{raster} has {src.count} band{'s' if src.count != 1 else ''}; the model reads bands "
            f"{','.join(map(str, bands))}",
            hint=f"choose {needed} of its bands with --bands, or a raster with {max(bands)} or more bands",
        )


# Centrelines ------------------------------------------------------------------------------------------------

_SIDES = ((-1, 0), (1, 0), (0, -1), (0, 1))
_CORNERS = ((-1, -1), (-1, 1), (1, -1), (1, 1))


def _links(pixel: tuple[int, int], pixels: set) -> list[tuple[int, int]]:
    """Skeleton neighbours; a diagonal counts only where no side-neighbour already joins the two pixels,
    so staircases do not form triangles that would look like junctions."""
    r, c = pixel
    out = [(r + dr, c + dc) for dr, dc in _SIDES if (r + dr, c + dc) in pixels]
    out += [(r + dr, c + dc) for dr, dc in _CORNERS
            if (r + dr, c + dc) in pixels and (r + dr, c) not in pixels and (r, c + dc) not in pixels]
    return out


def skeleton_paths(skeleton: np.ndarray, min_spur: float) -> list[np.ndarray]:
    """Pixel paths (k, 2) of (row, col) between ends and junctions of a 1-px skeleton, loops included.

    Paths with a free end shorter than ``min_spur`` pixels are dropped: spurs off a road, and specks.
    """
    pixels = set(zip(*map(np.ndarray.tolist, np.nonzero(skeleton))))
    links = {p: _links(p, pixels) for p in pixels}
    nodes = {p for p, near in links.items() if len(near) != 2}
    walked: set[frozenset] = set()

    def walk(start: tuple[int, int], step: tuple[int, int]) -> list[tuple[int, int]]:
        path = [start, step]
        walked.add(frozenset((start, step)))
        while path[-1] not in nodes:
            onward = [q for q in links[path[-1]] if frozenset((path[-1], q)) not in walked]
            if not onward:  # back at the start of a loop
                break
            walked.add(frozenset((path[-1], onward[0])))
            path.append(onward[0])
        return path

    # Junctions and ends first, so a loop walk only ever starts on a pure loop.
    paths = [walk(p, q) for p in (*nodes, *(pixels - nodes)) for q in links[p]
             if frozenset((p, q)) not in walked]
    kept = []
    for path in map(np.array, paths):
        length = np.hypot(*np.diff(path, axis=0).T).sum()
        free_end = len(links[tuple(path[0])]) == 1 or len(links[tuple(path[-1])]) == 1
        if length >= min_spur or not free_end:
            kept.append(path)
    return kept


def centrelines(
    probability: rasterio.DatasetReader, threshold: float, spur_m: float
) -> tuple[np.ndarray, np.ndarray]:
    """Road centrelines (shapely LineStrings in map coordinates) and their lengths in metres.

    Works in strips with context rows above and below, so memory stays flat; pieces are clipped to each
    strip's own rows and merged across strips. Without CRS, coordinates and lengths are in pixel space.
    """
    ground = ground_resolution_m(probability)
    size = ground or (abs(probability.transform.a), abs(probability.transform.e))
    spur_px = spur_m / min(ground) if ground else SPUR_PX_WITHOUT_CRS
    # Context longer than a spur: a path cut at the strip edge that reaches the core is never taken for one.
    context = int(max(64, 2 * spur_px))
    height, width = probability.height, probability.width
    pieces = []
    for row in range(0, height, STRIP_ROWS):
        top, bottom = max(0, row - context), min(height, row + STRIP_ROWS + context)
        window = Window(0, top, width, bottom - top)
        mask = (probability.read(1, window=window) >= threshold * 255) & (
            probability.read_masks(1, window=window) > 0)
        paths = skeleton_paths(skeletonize(mask), spur_px)
        if not paths:
            continue
        lines = [shapely.LineString(path[:, ::-1] + (0, top)) for path in paths]  # (x, y) = (col, row)
        # Pixel centres sit on integers here: cut half-way between this strip's rows and the next's. Steps join
        # neighbouring pixels, so both strips compute the same cut point exactly and the pieces merge.
        core = shapely.get_parts(shapely.clip_by_rect(lines, -1, row - 0.5, width, row + STRIP_ROWS - 0.5))
        pieces.extend(core[~shapely.is_empty(core)])
    if not pieces:
        return np.array([], dtype=object), np.zeros(0)
    lines = shapely.get_parts(shapely.line_merge(shapely.multilinestrings(pieces)))
    lengths = np.array([np.hypot(*(np.diff(shapely.get_coordinates(line), axis=0) * size).T).sum()
                        for line in lines])
    a, b, c, d, e, f = probability.transform[:6]

    def to_map(xy: np.ndarray) -> np.ndarray:
        col, row = xy[:, 0] + 0.5, xy[:, 1] + 0.5
        return np.column_stack((a * col + b * row + c, d * col + e * row + f))

    return shapely.transform(lines, to_map), lengths


def write_centrelines(probability: Path, out_path: Path, threshold: float, spur_m: float) -> int:
    """Vectorise a probability GeoTIFF into a GeoPackage line layer ``centrelines`` with ``length_m``."""
    import pyogrio.raw  # here: export and evaluation import this module, and only vectors need pyogrio

    partial = _partial(out_path)
    try:
        with _open(probability) as src, rasterio.Env(**GDAL_OPTIONS):
            lines, lengths = centrelines(src, threshold, spur_m)
            crs = src.crs.to_wkt() if src.crs else None
        if crs is None:
            events.warning(f"{probability} has no CRS: centreline coordinates and length_m are in pixels")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "'crs' was not provided")  # said once above, in our words
            # GeoPackage 1.2: the newest this GDAL writes (1.4) makes older QGIS builds (GDAL < 3.7) warn
            pyogrio.raw.write(partial, geometry=shapely.to_wkb(lines), field_data=[lengths],
                              fields=["length_m"], layer="centrelines", driver="GPKG",
                              geometry_type="LineString", crs=crs, dataset_options={"VERSION": "1.2"})
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    return len(lines)


# Command line -----------------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="road probability GeoTIFFs (and centrelines) for rasters with an ONNX model",
        description="Predict road probability (uint8 0-255 GeoTIFF on each raster's grid) with an ONNX "
        "model; tile size, overlap, normalisation and resolution come from the model's metadata.",
    )
    p.add_argument("model", type=Path, help="ONNX road model (ours or a Deepness segmentation model)")
    p.add_argument("rasters", type=Path, nargs="+", metavar="RASTER")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--vector", action="store_true", help="also write road centrelines as a GeoPackage")
    p.add_argument("--threshold", type=float, help="road probability threshold for --vector (default: the "
                   "model's seg_thresh)")
    p.add_argument("--spur-length", type=float, default=10.0, help="prune centreline spurs shorter than this "
                   "(metres; 20 px for rasters without CRS)")
    p.add_argument("--bands", help="1-based raster bands to feed the model, e.g. 1,2,3 (default: the bands it "
                   "was trained on, from its metadata, where the raster has them; else the first N it takes)")
    p.add_argument("--tta", action="store_true", help="average each tile over its 8 flips and right-angle "
                   "rotations (test-time augmentation): 8x the time, about 2 IoU points on the CIL benchmark")
    p.add_argument("--batch", type=_positive_int, default=4, help="tiles per inference call (default 4)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for onnxruntime (default: all cores, "
                   "shared among the workers)")
    p.add_argument("--workers", type=_positive_int, default=1, help="rasters predicted at once, each in its "
                   "own process; with CUDA, worker i uses GPU i (give one worker per GPU)")
    p.add_argument("--provider", choices=PROVIDERS, default="auto",
                   help="onnxruntime execution provider (default: auto, CUDA where it starts, else the CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=_run)


def _parse_bands(text: Optional[str], needed: int) -> Optional[list[int]]:
    """The bands of ``--bands``; None when not given (each raster gets the model's default)."""
    if text is None:
        return None
    try:
        bands = [int(b) for b in text.split(",")]
    except ValueError:
        bands = []
    if len(bands) != needed or min(bands) < 1:
        raise UserError(f"--bands {text}: the model needs {needed} band numbers (1-based)",
                        hint=f"e.g. --bands {','.join(map(str, range(1, needed + 1)))}")
    return bands


@dataclass(frozen=True)
class Job:
    """One raster to predict and its outputs."""

    raster: Path
    bands: list[int]
    probability: Path
    vector: Optional[Path]
    index: int  # 1-based position among ``count`` rasters, for progress events
    count: int


@dataclass(frozen=True)
class Settings:
    batch: int
    threshold: float
    spur_length: float
    tta: bool


def _plan(args: argparse.Namespace, model: OnnxSegmenter, bands: Optional[list[int]]) -> list[Job]:
    """Check every raster and output before any work, so a bad last raster does not cost an hour; warn about
    rasters whose bands or data type differ from the model's training rasters."""
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file", hint="give a folder for the outputs (created if missing)")
    jobs, owners = [], {}
    for index, raster in enumerate(args.rasters, 1):
        with _open(raster) as src:
            chosen = bands or model.info.default_bands(src.count)
            _check_bands(src, raster, chosen, model.info.bands)
            notes = [model.info.band_warning(chosen, str(raster), "--bands"),
                     model.info.dtype_warning(src.dtypes[chosen[0] - 1], str(raster)),
                     _grid_warning(src, raster, model.info)]
        for note in filter(None, notes):
            events.warning(note)
        probability = args.out / f"{raster.stem}{PROBABILITY_SUFFIX}"
        vector = args.out / f"{raster.stem}{CENTRELINES_SUFFIX}" if args.vector else None
        if probability in owners:
            raise UserError(f"{raster} and {owners[probability]} would both write {probability}",
                            hint="rename one of them, or predict them into different --out folders")
        owners[probability] = raster
        outputs = [p for p in (probability, vector) if p is not None]
        existing = [p for p in outputs if p.exists()]
        inputs = [r for r in args.rasters if r.exists() and any(p.samefile(r) for p in existing)]
        if inputs:  # --overwrite must never replace an input: it may still have to be read
            raise UserError(f"the output of {raster} would overwrite the input raster {inputs[0]}",
                            hint="predict into another --out folder")
        if existing and not args.overwrite:
            raise UserError(f"{existing[0]} already exists",
                            hint="pass --overwrite to replace it, or choose another --out")
        jobs.append(Job(raster, chosen, probability, vector, index, len(args.rasters)))
    return jobs


def _predict_job(model: OnnxSegmenter, job: Job, settings: Settings, cancelled: Callable[[], bool]) -> Optional[dict]:
    """Outputs of one raster (and their events); None when cancelled."""
    begun = time.monotonic()

    def progress(done: int, total: int) -> None:
        eta = (time.monotonic() - begun) / done * (total - done)
        events.progress("predict", done, total, eta, raster=str(job.raster), raster_index=job.index,
                        rasters=job.count)

    if not predict_file(model, job.raster, job.probability, job.bands, settings.batch, progress, cancelled,
                        settings.tta):
        return None
    events.artifact("probability", str(job.probability))
    output: dict[str, Any] = {"raster": str(job.raster), "probability": str(job.probability)}
    if job.vector is not None:
        count = write_centrelines(job.probability, job.vector, settings.threshold, settings.spur_length)
        events.artifact("centrelines", str(job.vector))
        output.update(centrelines=str(job.vector), lines=count)
    return output


# State of a worker process of ``--workers``: its model and the parent's stop flag.
_worker: dict[str, Any] = {}


def _start_worker(model_path: Path, provider: str, threads: int, messages: Any, halt: Any, counter: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole group: the parent stops us via halt
    with counter.get_lock():
        gpu, counter.value = counter.value, counter.value + 1
    events.redirect(lambda event, fields: messages.put((event, fields)) or True)
    model = load_model(model_path, provider, threads, gpu)
    for message in model.warnings:
        events.warning(message)
    _worker.update(model=model, halt=halt)


def _work(job: Job, settings: Settings) -> tuple[Optional[dict], str]:
    model = _worker["model"]
    return _predict_job(model, job, settings, _worker["halt"].is_set), model.provider


def _predict_parallel(args: argparse.Namespace, jobs: list[Job], settings: Settings, stop: list[bool],
                      reported: set[str]) -> tuple[list[Optional[dict]], str]:
    """Outputs per job (None where cancelled) from a pool of worker processes, and their providers."""
    workers = min(args.workers, len(jobs))
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # onnxruntime's and GDAL's threads do not survive a fork
    # A SimpleQueue writes before put() returns, so a finished job's events are all readable.
    messages, halt, counter = context.SimpleQueue(), context.Event(), context.Value("i", 0)

    def relay() -> None:
        while not messages.empty():
            event, fields = messages.get()
            if event == "warning":  # every worker repeats the model's warnings: say each once
                if fields["message"] in reported:
                    continue
                reported.add(fields["message"])
            events.emit(event, **fields)

    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(args.model, args.provider, threads, messages, halt, counter))
    futures: list[Future] = []
    try:
        futures = [pool.submit(_work, job, settings) for job in jobs]
        pending = set(futures)
        while pending:
            if stop and not halt.is_set():
                halt.set()  # running jobs stop at their next strip; queued ones never start
                for future in futures:
                    future.cancel()
            pending = wait(pending, timeout=0.1).not_done
            relay()
        relay()
        results = [(None, "") if f.cancelled() else f.result() for f in futures]
    finally:
        halt.set()
        while not all(f.done() for f in futures):  # keep reading: a worker blocks on a full pipe
            wait(futures, timeout=0.1)
            relay()
        pool.shutdown(cancel_futures=True)
    return [output for output, _ in results], ",".join(sorted({p for _, p in results if p}))


def _run(args: argparse.Namespace) -> None:
    parallel = args.workers > 1 and len(args.rasters) > 1
    # With workers, this copy of the model only checks the request; the workers load their own.
    model = load_model(args.model, "cpu" if parallel else args.provider, 1 if parallel else args.threads)
    for message in model.warnings:
        events.warning(message)
    events.log.info("model %s on %s: %s", args.model, f"{args.workers} workers" if parallel else model.provider,
                    model.info)
    threshold = model.info.threshold if args.threshold is None else args.threshold
    if not 0 < threshold < 1:
        raise UserError(f"--threshold {threshold} is outside (0, 1)", hint="e.g. --threshold 0.5")
    jobs = _plan(args, model, _parse_bands(args.bands, model.info.bands))
    settings = Settings(args.batch, threshold, args.spur_length, args.tta)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output folder {args.out}: {exc}", hint="choose a writable --out") from exc
    stop: list[bool] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    start = time.monotonic()
    try:
        if parallel:
            outputs, provider = _predict_parallel(args, jobs, settings, stop, set(model.warnings))
        else:
            outputs, provider = [], model.provider
            for job in jobs:
                outputs.append(_predict_job(model, job, settings, lambda: bool(stop)))
                if outputs[-1] is None:
                    break
    finally:
        signal.signal(signal.SIGTERM, previous)
    unfinished = [str(job.raster) for job, output in zip(jobs, outputs) if output is None]
    if unfinished:
        raise events.Cancelled(f"prediction cancelled, not finished: {', '.join(unfinished)}; no partial output "
                               "was kept", "run the command again")
    # The threshold its masks and vectors use: a caller that thresholds the probabilities itself (the plugin
    # without onnxruntime) learns the model's from here.
    events.emit("done", outputs=outputs, seconds=round(time.monotonic() - start, 1), provider=provider,
                threshold=threshold)
