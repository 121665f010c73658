"""``road-sslkd centrelines``: road centrelines (GeoPackage) of a road probability GeoTIFF already segmented.

The vectorisation is ``predict.write_centrelines``, the one ``predict --vector`` uses; this command serves
probability rasters made elsewhere (QGIS's own engine, an earlier ``predict``), with the threshold chosen
then.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rasterio.windows import Window

from . import events
from .events import UserError
from .predict import STRIP_ROWS, _open, write_centrelines


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "centrelines",
        help="road centrelines (GeoPackage) of a road probability GeoTIFF",
        description="Vectorise a road probability raster (uint8 0-255, as predict writes it) into a GeoPackage "
        "line layer 'centrelines' with a length_m field: the skeleton of the pixels at or above the threshold, "
        "spurs pruned.",
    )
    p.add_argument("probability", type=Path, help="road probability GeoTIFF (0-255, 255 = certainly road)")
    p.add_argument("--out", type=Path, required=True, help="GeoPackage to write (.gpkg)")
    p.add_argument("--threshold", type=float, default=0.5, help="road probability threshold (default 0.5; "
                   "use the model's seg_thresh, or the threshold of the road mask it goes with)")
    p.add_argument("--spur-length", type=float, default=10.0, help="prune centreline spurs shorter than this "
                   "(metres; 20 px for rasters without CRS)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    if not 0 < args.threshold < 1:
        raise UserError(f"--threshold {args.threshold} is outside (0, 1)", hint="e.g. --threshold 0.5")
    if args.spur_length < 0:
        raise UserError(f"--spur-length {args.spur_length} is negative", hint="e.g. --spur-length 10")
    if args.out.suffix.lower() != ".gpkg":
        raise UserError(f"--out {args.out} is not a GeoPackage name", hint=f"give it the .gpkg extension "
                        f"({args.out.with_suffix('.gpkg').name})")
    if args.out.exists() and not args.overwrite:
        raise UserError(f"{args.out} exists", hint="pass --overwrite to replace it, or choose another --out")
    _check_probability(args.probability)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    count = write_centrelines(args.probability, args.out, args.threshold, args.spur_length)
    if not count:
        _say_why_empty(args.probability, args.threshold)
    events.artifact("centrelines", str(args.out))
    events.emit("done", centrelines=str(args.out), lines=count)


def _check_probability(path: Path) -> None:
    """Refuse what is no 0-255 probability raster: a float 0-1 or multi-band raster would give no line, or
    lines of anything but roads, without a word."""
    with _open(path) as src:
        count, dtype = src.count, src.dtypes[0]
    if count != 1:
        raise UserError(f"{path} has {count} bands: a road probability raster has one (0-255)",
                        hint="give the probability GeoTIFF that predict or Segment roads wrote, not the imagery")
    if dtype != "uint8":
        raise UserError(f"{path} is {dtype}: a road probability raster is uint8, 0-255 (255 = certainly road)",
                        hint=f"rescale a 0-1 probability first (gdal_translate -ot Byte -scale 0 1 0 255 {path.name} "
                        "OUT.tif)")


def _say_why_empty(path: Path, threshold: float) -> None:
    """Warn that no pixel reached the threshold, with the highest value there is: a 0/1 road mask (highest 1)
    is the usual slip, and an empty GeoPackage alone would not tell it."""
    highest = 0
    with _open(path) as src:
        for row in range(0, src.height, STRIP_ROWS):
            values = src.read(1, window=Window(0, row, src.width, min(STRIP_ROWS, src.height - row)), masked=True)
            highest = max(highest, int(values.max()) if values.count() else 0)
    events.warning(f"{path}: no pixel reaches the threshold {threshold:g} ({math.ceil(threshold * 255)} of 255; "
                   f"the highest is {highest}), so the centrelines are empty. A road mask (0/1) is no probability "
                   "raster: give the probability (0-255), or lower the threshold")
