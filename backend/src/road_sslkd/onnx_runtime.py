"""ONNX road models: metadata, onnxruntime sessions and streaming raster prediction (numpy + onnxruntime).

The QGIS plugin imports this module in-process (visible-extent segmentation) and the backend's ``predict``
command runs whole rasters with it, so it must never import torch, rasterio or qgis. Rasters are reached
through two tiny interfaces, ``RasterSource`` and ``ProbabilitySink``: GDAL on the plugin side, rasterio on
the backend side.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Union

import numpy as np
import onnxruntime as ort

from .engine import dihedral, predict_strips
from .events import UserError

DEFAULT_TILE = 512
DEFAULT_OVERLAP_PCT = 15.0
DEFAULT_THRESHOLD = 0.5
PROVIDERS = ("auto", "cpu", "cuda")
NON_SEGMENTATION_TYPES = {"Detector", "Regressor", "Recognition", "Superresolution"}  # Deepness model_type
# ModelInfo field -> metadata keys (Deepness's), the first present wins.
META_KEYS = {
    "tile_size": ("tile_size", "tiles_size"),
    "overlap_pct": ("tiles_overlap",),
    "mean": ("standardization_mean",),
    "std": ("standardization_std",),
    "resolution_cm": ("resolution",),
    "threshold": ("seg_thresh",),
}
EXPORT_HINT = "export the model again with `road-sslkd export`, or check that it is a complete .onnx file"
TRAINING_KEY = "road_sslkd_training"  # our provenance summary: {"bands": [...], "dtype": "uint8", ...}
# numpy dtype -> GDAL type name, for the gdal_translate command a dtype warning suggests.
GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
              "int32": "Int32", "float32": "Float32", "float64": "Float64"}
METRES_PER_DEGREE = 111_320.0  # of latitude, and of longitude at the equator (spherical Earth)
# Relative difference between a raster's and the model's resolution below which the raster is read as it is
# (the backend's predict and the plugin alike).
RESAMPLE_TOLERANCE = 0.05
# A raster whose pixels are this many times finer or coarser than the model's gets a warning: resampled that far,
# roads look unlike the training imagery.
RESOLUTION_WARNING = 2.0


def metres_per_degree(latitude: float) -> tuple[float, float]:
    """Ground metres per degree of longitude and of latitude at ``latitude``: a geographic CRS's pixel size
    in metres, the same for the backend (rasterio) and the plugin (QGIS), so both read on one grid."""
    return METRES_PER_DEGREE * math.cos(math.radians(latitude)), METRES_PER_DEGREE


@dataclass(frozen=True)
class ModelInfo:
    """What prediction needs to know about a model, read once from its ONNX metadata (Deepness keys)."""

    bands: int
    tile_size: int = DEFAULT_TILE
    overlap_pct: float = DEFAULT_OVERLAP_PCT
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    resolution_cm: Optional[float] = None  # None: predict at the raster's own resolution
    threshold: float = DEFAULT_THRESHOLD
    output: str = "probabilities"  # or "logits" (our `road_sslkd_output` key)
    channels: int = 1  # 1: road; 2 or more: one channel per class, softmax over them
    road_channel: int = 0
    fixed_batch: Optional[int] = None  # models exported with a static batch size (often 1 in Deepness)
    fixed_size: Optional[int] = None  # models exported with a static height and width (then the tile size)
    defaulted: tuple[str, ...] = ()  # metadata keys that were missing
    training_bands: Optional[tuple[int, ...]] = None  # 1-based raster bands the model was trained on
    training_dtype: Optional[str] = None  # numpy name of the training rasters' data type ("uint8")

    @property
    def overlap_px(self) -> int:
        return min(self.tile_size - 1, max(0, round(self.tile_size * self.overlap_pct / 100)))

    def normalise(self, raw: np.ndarray) -> np.ndarray:
        """Raw bands (C, H, W) to model input, Deepness convention: divide by 255, then (x - mean) / std."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)
        image = raw.astype(np.float32)
        image *= 1.0 / (255.0 * std)
        image -= mean / std
        return image

    def default_bands(self, count: int) -> list[int]:
        """The bands to read from a raster of ``count`` bands when none were chosen: the training bands where
        the raster has them, else the first ``bands``."""
        if self.training_bands and max(self.training_bands) <= count:
            return list(self.training_bands)
        return list(range(1, self.bands + 1))

    def band_warning(self, chosen: list[int], what: str, option: str) -> Optional[str]:
        """Why bands ``chosen`` of ``what`` may give poor roads, when they are not the training bands;
        ``option`` names the band choice where the user is (``--bands`` on the command line, ``BANDS`` in
        Processing)."""
        if not self.training_bands or tuple(chosen) == self.training_bands:
            return None
        trained = ",".join(map(str, self.training_bands))
        return (f"the model was trained on bands {trained} but reads bands {','.join(map(str, chosen))} of "
                f"{what}: unless these hold the same imagery in the same order, expect poor roads (use {option} "
                f"{trained} on a raster that has those bands)")

    def dtype_warning(self, dtype: str, what: str) -> Optional[str]:
        """Why ``what`` (a raster of data type ``dtype``) may give poor roads, when the model was trained on
        another data type; None when they match or the model does not say (older runs, Deepness models)."""
        if not self.training_dtype or dtype == self.training_dtype:
            return None
        target = GDAL_TYPES.get(self.training_dtype, self.training_dtype)
        return (f"{what} is {dtype} but the model was trained on {self.training_dtype} imagery: pixels are scaled "
                f"as in training (divided by 255), so its values lie far outside what the model learnt; rescale "
                f"it to {self.training_dtype} (e.g. gdal_translate -ot {target} -scale IN.tif OUT.tif), or train "
                "a model on this kind of imagery")

    def resolution_warning(self, ground_m: float, source_pixels: float, what: str) -> Optional[str]:
        """Why ``what`` (``source_pixels`` pixels of ``ground_m`` metres) may segment poorly or slowly: a ground
        resolution far from the model's, to which it is resampled; None when close or the model does not say."""
        if not self.resolution_cm:
            return None
        factor = ground_m * 100 / self.resolution_cm  # raster pixel / model pixel: > 1 means upsampled
        if 1 / RESOLUTION_WARNING <= factor <= RESOLUTION_WARNING:
            return None
        return (f"{what} has {ground_m:.2f} m pixels but the model was trained at {self.resolution_cm / 100:.2f} m: "
                f"it is resampled {factor:.3g}x per side ({source_pixels * factor**2 / 1e6:,.0f} Mpx to segment), "
                "and roads at a scale this different look unlike the training imagery; prefer imagery or a model "
                "of similar resolution")

    def probabilities(self, output: np.ndarray) -> np.ndarray:
        """Model output (N, C, H, W) or (N, H, W) to road probability (N, H, W)."""
        if output.ndim == 3:
            output = output[:, None]
        if self.channels == 1:
            road = output[:, 0]
            return 0.5 * (np.tanh(0.5 * road) + 1.0) if self.output == "logits" else road
        if self.output == "logits":
            shifted = np.exp(output - output.max(axis=1, keepdims=True))
            return shifted[:, self.road_channel] / shifted.sum(axis=1)
        return output[:, self.road_channel]


def _meta_value(meta: dict[str, str], *keys: str) -> Any:
    """The first present key's value, JSON-decoded where it is JSON (Deepness writes json.dumps values)."""
    for key in keys:
        if key in meta:
            try:
                return json.loads(meta[key])
            except ValueError:
                return meta[key]
    return None


def _per_band(value: Any, bands: int, key: str, name: str) -> tuple[float, ...]:
    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if len(values) == 1:
        values *= bands
    if len(values) != bands:
        raise UserError(
            f"{name}: metadata {key} has {len(values)} values but the model takes {bands} bands",
            hint="fix the model's metadata_props (one value per input band) or export it again",
        )
    return tuple(values)


def _road_channel(class_names: Any, channels: int) -> Optional[int]:
    """Index of the class whose name mentions roads; None when no name does."""
    if isinstance(class_names, dict):
        named = {int(k): str(v) for k, v in class_names.items() if str(k).isdigit()}
    elif isinstance(class_names, list):
        named = dict(enumerate(map(str, class_names)))
    else:
        named = {}
    roads = [i for i, n in sorted(named.items()) if "road" in n.lower() and i < channels]
    return roads[0] if roads else None


def _training(meta: dict[str, str], bands: int) -> dict[str, Any]:
    """``training_bands`` and ``training_dtype`` from our provenance key, where present and consistent."""
    summary = _meta_value(meta, TRAINING_KEY)
    if not isinstance(summary, dict):
        return {}
    found: dict[str, Any] = {}
    trained = summary.get("bands")
    if isinstance(trained, list) and len(trained) == bands and all(isinstance(b, int) and b >= 1 for b in trained):
        found["training_bands"] = tuple(trained)
    if summary.get("dtype") in GDAL_TYPES:
        found["training_dtype"] = summary["dtype"]
    return found


def read_model_info(session: ort.InferenceSession, name: str) -> tuple[ModelInfo, list[str]]:
    """Parse the model's inputs, outputs and metadata; return the info and warnings for the user.

    Raises ``UserError`` for models that are not road segmentation models.
    """
    meta = dict(session.get_modelmeta().custom_metadata_map)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    in_shape, out_shape = list(inputs[0].shape), list(outputs[0].shape)
    model_type = _meta_value(meta, "model_type")
    if model_type in NON_SEGMENTATION_TYPES or len(in_shape) != 4 or len(out_shape) not in (3, 4):
        raise UserError(
            f"{name} is not a segmentation model (input {in_shape}, output {out_shape}, type {model_type})",
            hint="use a model that maps an image (N, C, H, W) to road logits or probabilities (N, 1|2, H, W)",
        )
    mean = _meta_value(meta, "standardization_mean")
    bands = in_shape[1] if isinstance(in_shape[1], int) else None
    if bands is None:
        bands = len(mean) if isinstance(mean, list) and len(mean) > 1 else 3
    channels = out_shape[1] if len(out_shape) == 4 and isinstance(out_shape[1], int) else 1
    road_channel = _road_channel(_meta_value(meta, "class_names"), channels)
    if road_channel is None:
        if channels > 2:
            raise UserError(
                f"{name} segments {channels} classes and none of its class_names mentions roads",
                hint="use a road model, or name the road class in the metadata key class_names",
            )
        road_channel = channels - 1  # Deepness binary models: class 0 background, class 1 the target
    values = {field: _meta_value(meta, *keys) for field, keys in META_KEYS.items()}
    fixed_size = in_shape[2] if isinstance(in_shape[2], int) and in_shape[2] == in_shape[3] else None
    if fixed_size:  # a fixed input size is the tile size
        values["tile_size"] = fixed_size
    defaulted = tuple(key for key, value in values.items() if value is None)
    converters: dict[str, Callable[[Any], Any]] = {
        "tile_size": int,
        "overlap_pct": float,
        "mean": lambda v: _per_band(v, bands, "standardization_mean", name),
        "std": lambda v: _per_band(v, bands, "standardization_std", name),
        "resolution_cm": float,
        "threshold": float,
    }
    try:
        present = {key: converters[key](value) for key, value in values.items() if value is not None}
    except (TypeError, ValueError) as exc:
        raise UserError(f"{name}: unreadable metadata ({exc})", hint="fix its metadata_props") from exc
    defaults = {"mean": (0.0,) * bands, "std": (1.0,) * bands}
    info = ModelInfo(
        bands=bands,
        output="logits" if _meta_value(meta, "road_sslkd_output") == "logits" else "probabilities",
        channels=channels,
        road_channel=road_channel,
        fixed_batch=in_shape[0] if isinstance(in_shape[0], int) else None,
        fixed_size=fixed_size,
        defaulted=defaulted,
        **_training(meta, bands),
        **{**defaults, **present},
    )
    warnings = []
    if defaulted:
        keys = ", ".join(META_KEYS[field][-1] for field in defaulted)
        warnings.append(
            f"{name} has no metadata {keys}: using tile {info.tile_size} px, overlap {info.overlap_pct:g} %, "
            f"pixels / 255 with mean {info.mean[0]:g} std {info.std[0]:g}, threshold {info.threshold:g}"
            + ("" if info.resolution_cm else ", and the raster's own resolution")
        )
    return info, warnings


def _session(path: Path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types for a bad file
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a usable ONNX model: {reason}", hint=EXPORT_HINT) from exc


def _cuda_driver_present() -> bool:
    """Whether an NVIDIA driver is installed; without one, trying CUDA only costs time and noise."""
    try:
        ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return False
    return True


def _cuda_session(path: Path, options: ort.SessionOptions, gpu: int) -> Optional[ort.InferenceSession]:
    """A session on CUDA device ``gpu``, or None when the CUDA provider does not start."""
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is not None:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints notes, and stdout carries JSON events
            preload()  # CUDA and cuDNN from the nvidia pip packages (the backend venv has them via torch)
    # A failing CUDA provider prints several lines and quietly falls back to the CPU: silence it, say it once.
    ort.set_default_logger_severity(4)
    try:
        session = _session(path, options, [("CUDAExecutionProvider", {"device_id": gpu}), "CPUExecutionProvider"])
    finally:
        ort.set_default_logger_severity(2)
    return session if "CUDAExecutionProvider" in session.get_providers() else None


def create_session(
    path: Union[str, Path], provider: str = "auto", threads: Optional[int] = None, gpu: int = 0
) -> tuple[ort.InferenceSession, list[str]]:
    """An onnxruntime session on CUDA when asked for (or ``auto``) and working, else on the CPU.

    Returns the session and the messages for the user: one line when CUDA was asked for, or when ``auto``
    found a GPU driver but CUDA did not start. ``threads`` sets the CPU thread count (None: all cores);
    ``gpu`` is the CUDA device number.
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}", hint="give the path of an .onnx model")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if provider == "cpu":
        return _session(path, options, ["CPUExecutionProvider"]), []
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        reason, worth_saying = "this onnxruntime has no CUDA provider (install onnxruntime-gpu)", False
    elif not _cuda_driver_present():
        reason, worth_saying = "no NVIDIA driver was found", False
    else:
        session = _cuda_session(path, options, gpu)
        if session is not None:
            return session, []
        reason = "it did not start (CUDA or cuDNN libraries missing or not matching, or a GPU fault)"
        worth_saying = True
    messages = [f"CUDA not used: {reason}; running on the CPU"] if worth_saying or provider == "cuda" else []
    return _session(path, options, ["CPUExecutionProvider"]), messages


class RasterSource(Protocol):
    """Full-width strips of the bands the model reads, raw values (any dtype)."""

    height: int
    width: int

    def read(self, row_off: int, rows: int) -> np.ndarray:
        """Bands (C, rows, width); a numpy masked array marks nodata (a pixel masked in all bands)."""


class ProbabilitySink(Protocol):
    """Where road probabilities go, in row order."""

    def write(self, row_off: int, probability: np.ndarray, valid: Optional[np.ndarray]) -> None:
        """uint8 (rows, width), 0-255; ``valid`` (rows, width) bool, None when the source has no nodata."""


def to_uint8(probability: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(probability, 0.0, 1.0) * 255.0).astype(np.uint8)


class _Stream:
    """Normalises what the source reads and keeps its nodata mask until those rows are written."""

    def __init__(self, source: RasterSource, sink: ProbabilitySink, info: ModelInfo) -> None:
        self.source, self.sink, self.info = source, sink, info
        self.row_off, self.valid = 0, None

    def read(self, y0: int, y1: int) -> np.ndarray:
        raw = self.source.read(y0, y1 - y0)
        if raw.ndim != 3 or raw.shape[0] != self.info.bands:
            raise ValueError(f"the source gave shape {raw.shape}, expected ({self.info.bands}, h, w)")
        self.row_off = y0
        self.valid = ~np.ma.getmaskarray(raw).all(axis=0) if np.ma.isMaskedArray(raw) else None
        image = self.info.normalise(np.ma.getdata(raw))
        if self.valid is not None:
            image[:, ~self.valid] = 0.0  # the band mean: neutral input instead of nodata values
        return image

    def write(self, y0: int, y1: int, probability: np.ndarray) -> None:
        out = to_uint8(probability)
        valid = None
        if self.valid is not None:  # predict_strips writes inside the rows of the latest read
            valid = self.valid[y0 - self.row_off : y1 - self.row_off]
            out[~valid] = 0
        self.sink.write(y0, out, valid)


class _ArraySource:
    def __init__(self, bands: np.ndarray) -> None:
        self.bands, (self.height, self.width) = bands, bands.shape[1:]

    def read(self, row_off: int, rows: int) -> np.ndarray:
        return self.bands[:, row_off : row_off + rows]


class _ArraySink:
    def __init__(self, height: int, width: int) -> None:
        self.out = np.ma.MaskedArray(np.zeros((height, width), np.uint8), np.zeros((height, width), bool))

    def write(self, row_off: int, probability: np.ndarray, valid: Optional[np.ndarray]) -> None:
        rows = slice(row_off, row_off + len(probability))
        self.out.data[rows] = probability
        if valid is not None:
            self.out.mask[rows] = ~valid


class OnnxSegmenter:
    """A road model ready to predict: the session, its ``ModelInfo`` and the warnings to show the user."""

    def __init__(
        self, session: ort.InferenceSession, info: ModelInfo, warnings: list[str], name: str
    ) -> None:
        self.session, self.info, self.warnings, self.name = session, info, warnings, name
        self.input_name = session.get_inputs()[0].name

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: batch})[0]
        if out.shape[0] != batch.shape[0] or out.shape[-2:] != batch.shape[-2:]:
            raise UserError(
                f"{self.name} is not a segmentation model: input {batch.shape} gave output {out.shape}",
                hint="use a model whose output has the input's height and width",
            )
        return out

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Normalised float32 tiles (N, C, T, T) to road probabilities (N, T, T)."""
        size = self.info.fixed_batch
        if size is None:
            return self.info.probabilities(self._run(batch))
        parts = []
        for first in range(0, len(batch), size):
            part = batch[first : first + size]
            padded = np.concatenate([part, np.zeros((size - len(part), *part.shape[1:]), part.dtype)])
            parts.append(self._run(padded)[: len(part)])
        return self.info.probabilities(np.concatenate(parts))

    def predict_raster(
        self,
        source: RasterSource,
        sink: ProbabilitySink,
        batch: int = 4,
        progress: Optional[Callable[[int, int], None]] = None,
        cancelled: Optional[Callable[[], bool]] = None,
        tta: bool = False,
    ) -> bool:
        """Stream ``source`` through the model into ``sink``, in strips; False when ``cancelled`` said stop.

        ``progress(done, total)`` counts tiles. The source must already be at the model's resolution. With
        ``tta`` each tile is the mean over its 8 flips and right-angle rotations (8 times the inference).
        """
        stream = _Stream(source, sink, self.info)
        return predict_strips(
            stream.read, stream.write, source.height, source.width, dihedral(self.infer) if tta else self.infer,
            self.info.tile_size, self.info.overlap_px, batch, progress=progress, cancelled=cancelled,
        )

    def predict_array(
        self,
        bands: np.ndarray,
        batch: int = 4,
        progress: Optional[Callable[[int, int], None]] = None,
        cancelled: Optional[Callable[[], bool]] = None,
        tta: bool = False,
    ) -> Optional[np.ma.MaskedArray]:
        """Road probability (H, W) uint8 0-255 for raw bands (C, H, W), masked where the input is nodata.

        ``bands`` may be a masked array (nodata); None when cancelled. ``tta`` as in ``predict_raster``.
        """
        sink = _ArraySink(*bands.shape[1:])
        finished = self.predict_raster(_ArraySource(bands), sink, batch, progress, cancelled, tta)
        return sink.out if finished else None


def load_model(
    path: Union[str, Path], provider: str = "auto", threads: Optional[int] = None, gpu: int = 0
) -> OnnxSegmenter:
    """Open an ONNX road model; raises ``UserError`` (message and hint) for anything the user can fix."""
    session, messages = create_session(path, provider, threads, gpu)
    info, warnings = read_model_info(session, str(path))
    return OnnxSegmenter(session, info, messages + warnings, str(path))
