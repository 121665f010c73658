"""Datasets of rasters: reading in windows, labels from masks or road lines, normalisation, random crops.

Pixels are scaled by 1/255 and then standardised per band with statistics computed on the run's rasters
(the Deepness convention, so exported students run in Deepness too). Nodata pixels, and NaN or infinite
values, are marked invalid and ignored by every loss, metric and statistic.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import rasterio
import torch
from rasterio.transform import Affine
from rasterio.windows import Window

from .events import UserError

# Plain PNG/JPEG tiles (like many benchmark sets) have no georeferencing: pixel space is fine for training.
warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)

VECTOR_SUFFIXES = {".gpkg", ".shp", ".geojson", ".json", ".fgb", ".sqlite", ".kml"}
WIDTH_FIELDS = ("width_m", "width")
CACHE_PIXELS = 16_000_000  # rasters up to this size are read once and kept; larger ones are read per window
# How far (in image pixels) a mask's corners may lie from its image's: exported grids round their origins far
# below it, while a mask shifted or scaled onto another footprint moves its labels by a pixel or more.
GRID_TOLERANCE_PX = 0.25
PathLike = Union[str, Path]


@dataclass(frozen=True)
class Pair:
    image: Path
    label: Path

    @property
    def is_vector(self) -> bool:
        return self.label.suffix.lower() in VECTOR_SUFFIXES


@dataclass
class DatasetSpec:
    labelled: list[Pair]
    unlabelled: list[Path] = field(default_factory=list)
    test: list[Pair] = field(default_factory=list)

    @classmethod
    def from_split(cls, folder: PathLike) -> DatasetSpec:
        folder = Path(folder)
        split = folder / "split.json"
        try:
            data = json.loads(split.read_text())
        except FileNotFoundError as exc:
            raise UserError(f"no split.json in {folder}", "a dataset folder needs split.json (see DESIGN.md)") from exc
        except ValueError as exc:
            raise UserError(f"{split} is not valid JSON: {exc}", "fix the file") from exc
        try:
            spec = cls(
                labelled=[Pair(folder / p["image"], folder / p["mask"]) for p in data.get("labelled", [])],
                unlabelled=[folder / p for p in data.get("unlabelled", [])],
                test=[Pair(folder / p["image"], folder / p["mask"]) for p in data.get("test", [])],
            )
        except (KeyError, TypeError) as exc:
            message = f"{split}: entries need 'image' and 'mask' ({exc})"
            raise UserError(message, "see DESIGN.md's split format") from exc
        return spec._require_files(f"check {split}: its paths are relative to {folder}")

    @classmethod
    def from_lists(cls, labelled: list[str], unlabelled: list[str], test: list[str]) -> DatasetSpec:
        """Pairs and rasters given on the command line."""
        spec = cls([parse_pair(p) for p in labelled], [Path(p) for p in unlabelled], [parse_pair(p) for p in test])
        return spec._require_files(f"check the path: relative paths are relative to the current folder, {Path.cwd()}")

    @classmethod
    def from_args(cls, folder: Optional[Path], labelled: Sequence[str] = (), unlabelled: Sequence[str] = (),
                  test: Sequence[str] = ()) -> DatasetSpec:
        """``--data DIR`` or explicit lists, never both: one of them would be silently ignored."""
        given = [flag for flag, paths in (("--labelled", labelled), ("--unlabelled", unlabelled), ("--test", test))
                 if paths]
        if folder and given:
            raise UserError(f"--data and {'/'.join(given)} were both given",
                            f"give either --data DIR (its split.json lists every raster) or {'/'.join(given)}")
        return cls.from_split(folder) if folder else cls.from_lists(list(labelled), list(unlabelled), list(test))

    def _require_files(self, hint: str) -> DatasetSpec:
        """Missing files fail here, with a hint on where their paths came from (rasters open much later)."""
        pairs = [*self.labelled, *self.test]
        for path in [*(p.image for p in pairs), *(p.label for p in pairs), *self.unlabelled]:
            if not path.exists():
                raise UserError(f"file not found: {path}", hint)
        return self

    def to_json(self) -> dict:
        """Absolute paths: a run resumed, evaluated or exported from another folder still finds its rasters."""
        def pair(p: Pair) -> dict:
            return {"image": str(p.image.absolute()), "mask": str(p.label.absolute())}

        return {
            "labelled": [pair(p) for p in self.labelled],
            "unlabelled": [str(p.absolute()) for p in self.unlabelled],
            "test": [pair(p) for p in self.test],
        }

    @classmethod
    def from_json(cls, data: dict) -> DatasetSpec:
        """A run's stored dataset; its files are not required (export and evaluate --test work without them)."""
        def pair(p: dict) -> Pair:
            return Pair(Path(p["image"]), Path(p["mask"]))

        return cls([pair(p) for p in data["labelled"]], [Path(p) for p in data["unlabelled"]],
                   [pair(p) for p in data["test"]])


_PAIR = re.compile(r"^((?:[A-Za-z]:[\\/])?[^:]+):((?:[A-Za-z]:[\\/])?[^:]+)$")


def parse_pair(text: str) -> Pair:
    """``IMAGE:LABEL`` (or ``IMAGE::LABEL``); a Windows drive letter (``C:\\``) is not a separator."""
    if "::" in text:
        image, label = text.split("::", 1)
        return Pair(Path(image), Path(label))
    match = _PAIR.match(text)
    if not match:
        raise UserError(f"cannot split '{text}' into IMAGE:LABEL", "write IMAGE:LABEL, or IMAGE::LABEL")
    return Pair(Path(match.group(1)), Path(match.group(2)))


def _open(path: Path) -> rasterio.DatasetReader:
    if not path.exists():
        raise UserError(f"file not found: {path}", "check the path")
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        hint = "give a raster GDAL can open (GeoTIFF, PNG, JPEG)"
        raise UserError(f"cannot read raster {path}: {exc}", hint) from exc


class Raster:
    """Selected bands of a raster, read by window as float32 (value / 255) with a validity mask."""

    def __init__(self, path: PathLike, bands: list[int]) -> None:
        self.path = Path(path)
        self.ds = _open(self.path)
        if max(bands) > self.ds.count or min(bands) < 1:
            raise UserError(
                f"{self.path} has {self.ds.count} band(s); bands {bands} were asked for",
                "choose existing bands with --bands (e.g. --bands 1,2,3)",
            )
        self.bands = list(bands)
        self.height, self.width = self.ds.height, self.ds.width
        self._cache: Optional[tuple[np.ndarray, np.ndarray]] = None
        if self.height * self.width <= CACHE_PIXELS:
            self._cache = self._read(window=Window(0, 0, self.width, self.height))

    def _read(self, **where: Any) -> tuple[np.ndarray, np.ndarray]:
        """Pixels and validity of a window (``window=``) or a decimated whole (``out_shape=``)."""
        image = self.ds.read(self.bands, **where).astype(np.float32) / 255.0
        valid = np.all(self.ds.read_masks(self.bands, **where) > 0, axis=0)
        # NaN and infinite values (float rasters often have them without a declared nodata) are nodata too,
        # and zeroed: one of them would turn a normaliser, a network's output and its loss into NaN.
        finite = np.isfinite(image)
        if not finite.all():
            valid &= finite.all(axis=0)
            image[~finite] = 0.0
        return image, valid

    def read(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is not None:
            image, valid = self._cache
            return image[:, y : y + h, x : x + w], valid[y : y + h, x : x + w]
        return self._read(window=Window(x, y, w, h))

    def overview(self, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """A decimated read of the whole raster (for statistics and sanity checks)."""
        scale = max(1, max(self.height, self.width) // size)
        return self._read(out_shape=(len(self.bands), max(1, self.height // scale), max(1, self.width // scale)))


class Label:
    """Road mask (0/1 uint8) on an image's grid, from a raster mask or from buffered vector roads."""

    def __init__(self, pair: Pair, raster: Raster, width: float) -> None:
        self.path = pair.label
        self.raster = raster
        if pair.is_vector:
            self._mask = _rasterise_vector(pair.label, raster, width)
            self.ds = None
        else:
            self.ds = _open(pair.label)
            self._check_grid(pair, raster)
            self._mask = None
            if raster.height * raster.width <= CACHE_PIXELS:
                self._mask = self._read_raster(window=Window(0, 0, raster.width, raster.height))
            self._check_background()

    def _check_grid(self, pair: Pair, raster: Raster) -> None:
        """A single-band mask on its image's pixel grid: same size, georeferencing, CRS and footprint."""
        mask, image = self.ds, raster.ds
        if mask.count != 1:
            raise UserError(f"mask {pair.label} has {mask.count} bands; a mask has one (road > 0, background 0)",
                            f"keep the band that holds the roads, e.g. gdal_translate -b 1 {pair.label} mask.tif")
        if (mask.height, mask.width) != (image.height, image.width):
            raise UserError(
                f"mask {pair.label} is {mask.width}x{mask.height} px but its image {pair.image} is "
                f"{image.width}x{image.height}",
                "masks must be on the image's pixel grid; resample the mask to the image",
            )
        # Plain PNG/JPEG pairs (no CRS, identity transform) are matched in pixel space; georeferencing on one
        # side only means the two were not made on the same grid.
        if _georeferenced(mask) != _georeferenced(image):
            lacking, having = (("mask", pair.label), ("image", pair.image)) if _georeferenced(image) else (
                ("image", pair.image), ("mask", pair.label))
            raise UserError(f"{lacking[0]} {lacking[1]} has no georeferencing but its {having[0]} {having[1]} has",
                            "give both the same georeferencing (gdal_edit.py -a_srs and -a_ullr, or a world "
                            "file), or neither")
        if mask.crs != image.crs:
            raise UserError(
                f"mask {pair.label} is in {mask.crs or 'no CRS'} but its image {pair.image} in {image.crs or 'no CRS'}",
                f"reproject the mask onto the image's grid (gdalwarp), or, when it only lacks one, assign the "
                f"image's CRS (gdal_edit.py -a_srs {image.crs or mask.crs} FILE)",
            )
        offset = _grid_offset(image.transform, mask.transform, image.width, image.height)
        if offset > GRID_TOLERANCE_PX:
            raise UserError(
                f"mask {pair.label} covers another footprint than its image {pair.image}: its corners lie up "
                f"to {offset:.1f} px from the image's",
                "resample the mask onto the image's grid (gdalwarp with the image's -te bounds and -ts size)",
            )

    def _check_background(self) -> None:
        """Refuse a raster mask whose labelled pixels are all road.

        A real road mask always has background, so no legitimate mask can be refused. A mask without any is
        most often a 0/1 mask whose nodata value is 0 (rasterising tools write one): every background pixel
        became "unknown", and training would learn that everything is road.
        """
        mask = self._whole()
        if (mask == 0).any() or not (mask == 1).any():
            return  # background, or no road at all (training says so: LabelledSet.require_roads)
        if self.ds.nodata is not None and (mask == 255).any():
            raise UserError(f"mask {self.path} has no background pixel: its nodata value {self.ds.nodata:g} "
                            "marks them all as unknown",
                            f"unset the nodata value (gdal_edit.py -unsetnodata {self.path}), or give unknown "
                            "pixels a nodata value that background does not have")
        raise UserError(f"mask {self.path} has no background pixel: every labelled pixel is road",
                        "masks hold background as 0 and roads > 0; an alpha or mask band must not hide the "
                        "background")

    def _read_raster(self, **where: Any) -> np.ndarray:
        """0/1 road of a window (``window=``) or a decimated whole (``out_shape=``); 255 where unknown."""
        band = self.ds.read(1, **where)
        # Nodata, masked and NaN pixels are "unknown", ignored like nodata in images.
        valid = (self.ds.read_masks(1, **where) > 0) & np.isfinite(band)
        return np.where(valid, (band > 0).astype(np.uint8), 255).astype(np.uint8)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        if self._mask is not None:
            return self._mask[y : y + h, x : x + w]
        return self._read_raster(window=Window(x, y, w, h))

    def _whole(self) -> np.ndarray:
        """The whole label: the one kept in memory, or a decimated read of a large mask."""
        return self._mask if self._mask is not None else self._read_raster(out_shape=(512, 512))

    def road_fraction(self) -> float:
        """Road share of the labelled (known) pixels; 0 when none is labelled."""
        mask = self._whole()
        known = mask != 255
        return float((mask == 1).sum() / max(1, known.sum()))


def _georeferenced(ds: rasterio.DatasetReader) -> bool:
    return ds.crs is not None or not ds.transform.is_identity


def _grid_offset(image: Affine, mask: Affine, width: int, height: int) -> float:
    """The largest distance, in image pixels, between a corner of the mask's grid and the image's."""
    to_image = ~image * mask  # mask pixel -> map -> image pixel
    corners = [(0, 0), (width, 0), (0, height), (width, height)]
    return max(max(abs(c - x), abs(r - y)) for x, y in corners for c, r in [to_image * (x, y)])


def road_prior(labels: list[Label]) -> float:
    """The road fraction of labelled pixels over all masks (each weighted by its area)."""
    areas = [label.raster.height * label.raster.width for label in labels]
    return float(np.average([label.road_fraction() for label in labels], weights=areas))


def _rasterise_vector(path: Path, raster: Raster, width: float) -> np.ndarray:
    import pyogrio
    import shapely
    from rasterio.features import rasterize

    if not path.exists():
        raise UserError(f"file not found: {path}", "check the label path")
    try:
        meta, _, wkb, field_data = pyogrio.raw.read(path)
    except Exception as exc:  # noqa: BLE001 - pyogrio raises many types for unreadable files
        raise UserError(f"cannot read vector labels {path}: {exc}", "give a GeoPackage, Shapefile or GeoJSON") from exc
    # A per-feature width field wins over the run's default width; both are ground units: the image CRS's,
    # or metres when it is geographic (see _buffer_lines).
    names = [str(n) for n in meta.get("fields", [])]
    lower = [n.lower() for n in names]
    index = next((lower.index(n) for n in WIDTH_FIELDS if n in lower), None)
    values = field_data[index] if index is not None else [None] * len(wkb)
    width_field = names[index] if index is not None else ""
    features = [(g, _feature_width(v, width, width_field, path))
                for g, v in zip(shapely.from_wkb(wkb), values) if g is not None and not g.is_empty]
    if not features:
        raise UserError(f"{path} holds no geometry", "digitise road lines or polygons first")
    geometries, widths = [g for g, _ in features], [w for _, w in features]
    src_crs, dst_crs = meta.get("crs"), raster.ds.crs
    if src_crs and dst_crs and rasterio.crs.CRS.from_user_input(src_crs) != dst_crs:
        geometries = _reproject(geometries, src_crs, dst_crs)
    if raster.height * raster.width > CACHE_PIXELS * 4:
        raise UserError(f"{raster.path} is too large to rasterise vector labels in memory",
                        "rasterise the road lines to a mask on the image grid first (gdal_rasterize)")
    return rasterize(_buffer_lines(geometries, widths, raster), out_shape=(raster.height, raster.width),
                     transform=raster.ds.transform, fill=0, default_value=1, dtype="uint8")


def _feature_width(value: Any, default: float, field_name: str, path: Path) -> float:
    """A feature's road width: its width field's positive number, else (empty, zero, NaN) the run's width."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"the road width field '{field_name}' of {path} holds '{value}', not a number",
                        f"store widths in '{field_name}' as plain numbers (5, not '5 m'), or rename the field so "
                        "that the run's road width is used") from None
    return number if number > 0 else default


def _reproject(geometries: list, src_crs: Any, dst_crs: Any) -> list:
    """Shapely geometries from one CRS to another (2D)."""
    import shapely
    from rasterio.warp import transform

    def points(xy: np.ndarray) -> np.ndarray:
        return np.column_stack(transform(src_crs, dst_crs, xy[:, 0], xy[:, 1]))

    return list(shapely.transform(np.asarray(geometries, dtype=object), points))


def _buffer_lines(geometries: list, widths: list[float], raster: Raster) -> list:
    """Lines buffered to their full width (polygons kept as they are), in the image's CRS.

    Widths are in the image CRS's units, except for a geographic CRS, whose degrees are no road width: there
    the buffering happens in metres, in an azimuthal equidistant projection centred on the image (distances
    true from its centre, and off by under 0.5 % within 1000 km of it), and the shapes go back.
    """
    crs, local = raster.ds.crs, None
    if crs is not None and crs.is_geographic:
        bounds = raster.ds.bounds
        lon, lat = (bounds.left + bounds.right) / 2, (bounds.bottom + bounds.top) / 2
        local = rasterio.crs.CRS.from_proj4(f"+proj=aeqd +lat_0={lat} +lon_0={lon} +ellps=WGS84 +units=m")
        geometries = _reproject(geometries, crs, local)
    shapes = [g if g.geom_type.endswith("Polygon") else g.buffer(w / 2, cap_style="flat")
              for g, w in zip(geometries, widths)]
    return _reproject(shapes, local, crs) if local is not None else shapes


@dataclass
class Normalizer:
    mean: list[float]
    std: list[float]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        return (image - mean) / std

    @classmethod
    def fit(cls, rasters: list[Raster]) -> Normalizer:
        """Per-band mean and std over the valid pixels of a decimated read of each raster."""
        samples = []
        for raster in rasters:
            image, valid = raster.overview()
            samples.append(image[:, valid])
        pixels = np.concatenate(samples, axis=1)
        return cls(pixels.mean(axis=1).tolist(), np.maximum(pixels.std(axis=1), 1e-3).tolist())


def check_raster(raster: Raster) -> None:
    _, valid = raster.overview()
    if not valid.any():
        raise UserError(f"{raster.path} has no valid pixel (all nodata or NaN)", "remove it from the dataset")


class LabelledSet:
    """Image rasters with their labels, checked once when opened."""

    def __init__(self, pairs: list[Pair], bands: list[int], width: float) -> None:
        self.items: list[tuple[Raster, Label]] = []
        for pair in pairs:
            raster = Raster(pair.image, bands)
            check_raster(raster)
            label = Label(pair, raster, width)
            self.items.append((raster, label))

    def require_roads(self) -> None:
        for _, label in self.items:
            if label.road_fraction() == 0:
                raise UserError(f"label {label.path} has no road pixel",
                                "check the mask (roads must be > 0) or the vector layer's extent and width")


class CropSampler:
    """Random square crops (the same size for all, padded as invalid where a raster is smaller).

    With ``targets`` (per teacher, one uint8 probability map per raster, see targets.py) a batch also holds
    the teachers' cached outputs for the same pixels as "targets" (B, teachers, H, W) in 0..1. With
    ``features`` (per teacher, its stride and one int8 (C, H / stride, W / stride) map per raster) it holds
    "features_<i>" (B, C, crop / stride, crop / stride) for teacher i, and crops start on every stride's grid.
    """

    def __init__(self, rasters: list[Raster], labels: Optional[list[Label]], crop: int, normalizer: Normalizer,
                 seed: int, targets: Optional[list[list[np.ndarray]]] = None,
                 features: Optional[list[tuple[int, list[np.ndarray]]]] = None) -> None:
        self.rasters, self.labels, self.crop, self.normalizer = rasters, labels, crop, normalizer
        self.seed, self.targets, self.features = seed, targets, features or []
        self.align = int(np.lcm.reduce([s for s, _ in self.features])) if self.features else 1
        if crop % self.align:
            raise UserError(f"crop {crop} is not a multiple of the teachers' feature stride {self.align}",
                            f"set crop to a multiple of {self.align}")
        areas = np.array([r.height * r.width for r in rasters], dtype=np.float64)
        self.weights = areas / areas.sum()
        self.rng = np.random.default_rng(seed)

    def with_targets(self, targets: list[list[np.ndarray]],
                     features: Optional[list[tuple[int, list[np.ndarray]]]] = None) -> CropSampler:
        """The same crops (same seed) with teacher targets (and features) attached."""
        return CropSampler(self.rasters, self.labels, self.crop, self.normalizer, self.seed, targets, features)

    def sample(self, batch: int) -> dict[str, torch.Tensor]:
        c = self.crop
        images = np.zeros((batch, len(self.rasters[0].bands), c, c), np.float32)
        labels = np.zeros((batch, c, c), np.float32)
        valid = np.zeros((batch, c, c), bool)
        targets = np.zeros((batch, len(self.targets), c, c), np.float32) if self.targets else None
        features = [np.zeros((batch, maps[0].shape[0], c // s, c // s), np.float32) for s, maps in self.features]
        for i in range(batch):
            k = self.rng.choice(len(self.rasters), p=self.weights)
            raster = self.rasters[k]
            h, w = min(c, raster.height), min(c, raster.width)
            a = self.align
            y = int(self.rng.integers(0, raster.height - h + 1)) // a * a
            x = int(self.rng.integers(0, raster.width - w + 1)) // a * a
            image, ok = raster.read(y, x, h, w)
            images[i, :, :h, :w] = self.normalizer(image)
            if self.labels is not None:
                lab = self.labels[k].read(y, x, h, w)
                ok = ok & (lab != 255)
                labels[i, :h, :w] = lab == 1
            if targets is not None:
                for t, maps in enumerate(self.targets):
                    targets[i, t, :h, :w] = maps[k][y : y + h, x : x + w] / np.float32(255)
            for out_features, (s, maps) in zip(features, self.features):
                fy, fx, fh, fw = y // s, x // s, -(-h // s), -(-w // s)
                out_features[i, :, :fh, :fw] = maps[k][:, fy : fy + fh, fx : fx + fw] / np.float32(127)
            valid[i, :h, :w] = ok
        out = {"image": torch.from_numpy(images), "valid": torch.from_numpy(valid)}
        if self.labels is not None:
            out["label"] = torch.from_numpy(labels)
        if targets is not None:
            out["targets"] = torch.from_numpy(targets)
        out.update({f"features_{t}": torch.from_numpy(f) for t, f in enumerate(features)})
        return out

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

