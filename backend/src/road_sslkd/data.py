"""Datasets of rasters: reading in windows, labels from masks or road lines, normalisation, random crops.

Pixels are scaled by 1/255 and then standardised per band with statistics computed on the run's rasters
(the Deepness convention, so exported students run in Deepness too). Nodata pixels are marked invalid and
ignored by every loss and metric.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from .events import UserError

# Plain PNG/JPEG tiles (like many benchmark sets) have no georeferencing: pixel space is fine for training.
warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)

VECTOR_SUFFIXES = {".gpkg", ".shp", ".geojson", ".json", ".fgb", ".sqlite", ".kml"}
WIDTH_FIELDS = ("width_m", "width")
CACHE_PIXELS = 16_000_000  # rasters up to this size are read once and kept; larger ones are read per window
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
            return cls(
                labelled=[Pair(folder / p["image"], folder / p["mask"]) for p in data.get("labelled", [])],
                unlabelled=[folder / p for p in data.get("unlabelled", [])],
                test=[Pair(folder / p["image"], folder / p["mask"]) for p in data.get("test", [])],
            )
        except (KeyError, TypeError) as exc:
            message = f"{split}: entries need 'image' and 'mask' ({exc})"
            raise UserError(message, "see DESIGN.md's split format") from exc

    @classmethod
    def from_lists(cls, labelled: list[str], unlabelled: list[str], test: list[str]) -> DatasetSpec:
        return cls([parse_pair(p) for p in labelled], [Path(p) for p in unlabelled], [parse_pair(p) for p in test])

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
        return cls.from_lists(
            [f"{p['image']}::{p['mask']}" for p in data["labelled"]],
            data["unlabelled"],
            [f"{p['image']}::{p['mask']}" for p in data["test"]],
        )


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
        raise UserError(f"file not found: {path}", "check the path (relative paths are relative to split.json)")
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
            self._cache = self._read(Window(0, 0, self.width, self.height))

    def _read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        image = self.ds.read(self.bands, window=window).astype(np.float32) / 255.0
        valid = np.all(self.ds.read_masks(self.bands, window=window) > 0, axis=0)
        return image, valid

    def read(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is not None:
            image, valid = self._cache
            return image[:, y : y + h, x : x + w], valid[y : y + h, x : x + w]
        return self._read(Window(x, y, w, h))

    def overview(self, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """A decimated read of the whole raster (for statistics and sanity checks)."""
        scale = max(1, max(self.height, self.width) // size)
        shape = (len(self.bands), max(1, self.height // scale), max(1, self.width // scale))
        image = self.ds.read(self.bands, out_shape=shape).astype(np.float32) / 255.0
        valid = np.all(self.ds.read_masks(self.bands, out_shape=shape) > 0, axis=0)
        return image, valid


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
            if (self.ds.height, self.ds.width) != (raster.height, raster.width):
                raise UserError(
                    f"mask {pair.label} is {self.ds.width}x{self.ds.height} px but its image {pair.image} is "
                    f"{raster.width}x{raster.height}",
                    "masks must be on the image's pixel grid; resample the mask to the image",
                )
            if self.ds.crs and raster.ds.crs and self.ds.crs != raster.ds.crs:
                raise UserError(
                    f"mask {pair.label} is in {self.ds.crs} but its image in {raster.ds.crs}",
                    "reproject the mask onto the image's grid",
                )
            self._mask = None
            if raster.height * raster.width <= CACHE_PIXELS:
                self._mask = self._read_raster(Window(0, 0, raster.width, raster.height))

    def _read_raster(self, window: Window) -> np.ndarray:
        band = self.ds.read(1, window=window)
        valid = self.ds.read_masks(1, window=window) > 0
        # 255 marks "unknown" in the second array: such pixels are ignored like nodata.
        return np.where(valid, (band > 0).astype(np.uint8), 255).astype(np.uint8)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        if self._mask is not None:
            return self._mask[y : y + h, x : x + w]
        return self._read_raster(Window(x, y, w, h))

    def road_fraction(self) -> float:
        if self._mask is not None:
            mask = self._mask
        else:
            mask = np.where(self.ds.read_masks(1, out_shape=(512, 512)) > 0,
                            self.ds.read(1, out_shape=(512, 512)) > 0, 255)
        known = mask != 255
        return float((mask == 1).sum() / max(1, known.sum()))


def road_prior(labels: list[Label]) -> float:
    """The road fraction of labelled pixels over all masks (each weighted by its area)."""
    areas = [label.raster.height * label.raster.width for label in labels]
    return float(np.average([label.road_fraction() for label in labels], weights=areas))


def _rasterise_vector(path: Path, raster: Raster, width: float) -> np.ndarray:
    import pyogrio
    import shapely
    from rasterio.features import rasterize
    from rasterio.warp import transform_geom

    if not path.exists():
        raise UserError(f"file not found: {path}", "check the label path")
    try:
        meta, _, wkb, field_data = pyogrio.raw.read(path)
    except Exception as exc:  # noqa: BLE001 - pyogrio raises many types for unreadable files
        raise UserError(f"cannot read vector labels {path}: {exc}", "give a GeoPackage, Shapefile or GeoJSON") from exc
    # A per-feature width field wins over the run's default width; both are in the image CRS's units
    # (the lines are buffered after reprojection).
    names = [str(n).lower() for n in meta.get("fields", [])]
    field = next((n for n in WIDTH_FIELDS if n in names), None)
    widths = field_data[names.index(field)] if field else [width] * len(wkb)
    features = [(g, float(w) if w is not None and float(w) > 0 else width)
                for g, w in zip(shapely.from_wkb(wkb), widths) if g is not None and not g.is_empty]
    if not features:
        raise UserError(f"{path} holds no geometry", "digitise road lines or polygons first")
    src_crs, dst_crs = meta.get("crs"), raster.ds.crs
    if src_crs and dst_crs and rasterio.crs.CRS.from_user_input(src_crs) != dst_crs:
        features = [(shapely.geometry.shape(transform_geom(src_crs, dst_crs, shapely.geometry.mapping(g))), w)
                    for g, w in features]
    shapes = [g if g.geom_type.endswith("Polygon") else g.buffer(w / 2, cap_style="flat") for g, w in features]
    if raster.height * raster.width > CACHE_PIXELS * 4:
        raise UserError(f"{raster.path} is too large to rasterise vector labels in memory",
                        "rasterise the road lines to a mask on the image grid first (gdal_rasterize)")
    return rasterize(shapes, out_shape=(raster.height, raster.width), transform=raster.ds.transform,
                     fill=0, default_value=1, dtype="uint8")


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
        raise UserError(f"{raster.path} has no valid pixel (all nodata)", "remove it from the dataset")


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

