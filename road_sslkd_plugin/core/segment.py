"""Road segmentation of a raster layer's extent: the widget-free core shared by the map action and Processing.

Steps, each a small function: ``load_model`` (the backend's ONNX engine, imported in-process from its
source folder), ``plan_window`` (an extent in any CRS -> a pixel grid on the layer at the model's ground
resolution), ``read_bands`` (QgsRasterDataProvider blocks -> a numpy masked array, nodata kept),
``predict`` (tiled inference, progress and cancel) and ``write_geotiff`` (GDAL, uint8, written to a
temporary name and renamed, so a failed or cancelled run leaves no half-written file).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCsException,
    QgsProject,
    QgsRasterDataProvider,
    QgsRasterLayer,
    QgsRectangle,
    QgsUnitTypes,
)

from ..compat import DISTANCE_METERS, DISTANCE_UNKNOWN, WKT_PREFERRED_GDAL, qgis_enum
from .backend import PLUGIN_DIR, backend_source_dir

DEFAULT_MAX_PIXELS = 40_000_000  # a canvas extent larger than this at the model's resolution: zoom in
EXACT_MASK_PIXELS = 1_000_000  # nodata bitmaps up to this size are read pixel by pixel
ENGINE_HINT = "install onnxruntime and numpy in QGIS's Python, or segment with `road-sslkd predict`"
ALPHA_BAND = qgis_enum("Qgis.RasterColorInterpretation.AlphaBand", "QgsRaster.ColorInterpretation.AlphaBand")


class SegmentError(Exception):
    """A problem the user can fix: ``message`` says what, ``hint`` how."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message, self.hint = message, hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


# ---------------------------------------------------------------------------------------------- engine
def backend_src_dir(plugin_dir: Path = PLUGIN_DIR) -> Optional[Path]:
    """``backend/src`` of the plugin zip or of the development checkout."""
    source = backend_source_dir(plugin_dir)
    return source / "src" if source is not None and (source / "src" / "road_sslkd").is_dir() else None


def engine_module(plugin_dir: Path = PLUGIN_DIR) -> Any:
    """``road_sslkd.onnx_runtime``, imported in-process (it needs only numpy and onnxruntime)."""
    src = backend_src_dir(plugin_dir)
    if src is not None and str(src) not in sys.path:
        sys.path.append(str(src))  # appended: an installed road_sslkd in QGIS's Python wins
    try:
        from road_sslkd import onnx_runtime
    except ImportError as exc:
        raise SegmentError(f"The ONNX engine cannot be loaded in QGIS's Python: {exc}", ENGINE_HINT) from exc
    return onnx_runtime


def engine_available() -> bool:
    try:
        engine_module()
    except SegmentError:
        return False
    return True


def load_model(path: str, threads: Optional[int] = None) -> Any:
    """An ``OnnxSegmenter``; the backend's ``UserError`` becomes ``SegmentError``."""
    if not path:
        raise SegmentError("No road model chosen", 'train one and click "Use this model", or pick an .onnx file')
    module = engine_module()
    from road_sslkd.events import UserError

    try:
        return module.load_model(path, provider="auto", threads=threads)
    except UserError as exc:
        raise SegmentError(exc.message, exc.hint) from exc


# ---------------------------------------------------------------------------------------------- window
@dataclass(frozen=True)
class ReadWindow:
    """A pixel grid on the layer: ``extent`` in the layer's CRS, ``width`` x ``height`` pixels."""

    extent: QgsRectangle
    width: int
    height: int
    crs: QgsCoordinateReferenceSystem

    @property
    def pixel_size(self) -> tuple[float, float]:
        return self.extent.width() / self.width, self.extent.height() / self.height

    def geotransform(self) -> tuple[float, float, float, float, float, float]:
        """GDAL geotransform, north up."""
        px, py = self.pixel_size
        return (self.extent.xMinimum(), px, 0.0, self.extent.yMaximum(), 0.0, -py)


def model_pixel_size(
    layer: QgsRasterLayer, resolution_cm: Optional[float], area: QgsRectangle
) -> tuple[float, float]:
    """The model's ground resolution in the layer's map units (x, y) over ``area``; the layer's own where
    unknown. In a geographic CRS a degree of longitude shrinks with latitude: the engine's own conversion
    (the backend's too) at the latitude of ``area``'s centre, so both read on the same grid."""
    native = (layer.rasterUnitsPerPixelX(), layer.rasterUnitsPerPixelY())
    crs = layer.crs()
    if not resolution_cm or crs.mapUnits() == DISTANCE_UNKNOWN:
        return native
    engine = engine_module()
    metres = resolution_cm / 100.0
    if crs.isGeographic():
        per_degree = engine.metres_per_degree(area.center().y())
        size = (metres / per_degree[0], metres / per_degree[1])
    else:
        size = (metres * QgsUnitTypes.fromUnitToUnitFactor(DISTANCE_METERS, crs.mapUnits()),) * 2
    if all(abs(s / n - 1) <= engine.RESAMPLE_TOLERANCE for s, n in zip(size, native)):
        return native  # close enough: read the pixels as they are, no resampling (as the backend does)
    return size


def resolution_note(layer: QgsRasterLayer, info: Any, window: ReadWindow) -> Optional[str]:
    """The engine's warning (``ModelInfo.resolution_warning``, as ``road-sslkd predict`` gives it) when the
    layer's pixels inside ``window`` are far finer or coarser than the model's; None otherwise."""
    crs = layer.crs()
    native = (layer.rasterUnitsPerPixelX(), layer.rasterUnitsPerPixelY())
    if not crs.isValid() or crs.mapUnits() == DISTANCE_UNKNOWN or min(native) <= 0:
        return None
    if crs.isGeographic():
        per_degree = engine_module().metres_per_degree(window.extent.center().y())
        ground = max(native[0] * per_degree[0], native[1] * per_degree[1])
    else:
        ground = max(native) * QgsUnitTypes.fromUnitToUnitFactor(crs.mapUnits(), DISTANCE_METERS)
    pixels = window.extent.width() / native[0] * window.extent.height() / native[1]
    return info.resolution_warning(ground, pixels, f"the layer {layer.name()}")


def plan_window(
    layer: QgsRasterLayer,
    extent: Optional[QgsRectangle] = None,
    extent_crs: Optional[QgsCoordinateReferenceSystem] = None,
    resolution_cm: Optional[float] = None,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    project: Optional[QgsProject] = None,
) -> ReadWindow:
    """The part of ``layer`` inside ``extent`` (the whole layer when None), on a grid aligned with the layer."""
    crs = layer.crs()
    full = layer.extent()
    area = QgsRectangle(full)
    if extent is not None and not extent.isNull():
        area = QgsRectangle(extent)
        if extent_crs is not None and extent_crs.isValid() and crs.isValid() and extent_crs != crs:
            transform = QgsCoordinateTransform(extent_crs, crs, project or QgsProject.instance())
            try:
                area = transform.transformBoundingBox(area)
            except QgsCsException as exc:
                raise SegmentError(
                    f"The extent cannot be transformed from {extent_crs.userFriendlyIdentifier()} to the CRS of "
                    f"the layer {layer.name()}, {crs.userFriendlyIdentifier()} ({exc})",
                    "zoom in to the layer, or give the project (or the extent) the layer's CRS",
                ) from exc
        area = area.intersect(full)
        if area.isEmpty():
            raise SegmentError(
                f"The extent does not overlap the layer {layer.name()}",
                "pan or zoom to the layer, or choose another layer or extent",
            )
    px, py = model_pixel_size(layer, resolution_cm, area)
    # Snap outwards to the layer's pixel grid (or the model grid from the layer's corner), inside the layer.
    x0 = full.xMinimum() + math.floor((area.xMinimum() - full.xMinimum()) / px + 1e-6) * px
    y1 = full.yMaximum() - math.floor((full.yMaximum() - area.yMaximum()) / py + 1e-6) * py
    width = max(1, math.ceil((min(area.xMaximum(), full.xMaximum()) - x0) / px - 1e-6))
    height = max(1, math.ceil((y1 - max(area.yMinimum(), full.yMinimum())) / py - 1e-6))
    if max_pixels and width * height > max_pixels:
        raise SegmentError(
            f"The extent is {width} x {height} pixels at the {'model' if resolution_cm else 'layer'}'s resolution "
            f"({px:g} map units per pixel), "
            f"more than the {max_pixels / 1e6:g} Mpx limit",
            "choose a smaller extent (zoom in), or segment the whole file with `road-sslkd predict`, which streams "
            "rasters of any size (so does Processing when QGIS's Python has no onnxruntime)",
        )
    window_extent = QgsRectangle(x0, y1 - height * py, x0 + width * px, y1)
    return ReadWindow(window_extent, width, height, crs)


# ---------------------------------------------------------------------------------------------- pixels
def _dtypes() -> dict[Any, str]:
    """QGIS raster data types -> numpy names (Int8 exists from QGIS 3.30, with GDAL 3.7's signed bytes)."""
    names = {"Byte": "uint8", "Int8": "int8", "UInt16": "uint16", "Int16": "int16", "UInt32": "uint32",
             "Int32": "int32", "Float32": "float32", "Float64": "float64"}
    return {getattr(Qgis.DataType, kind): name for kind, name in names.items() if hasattr(Qgis.DataType, kind)}


def _plural(count: int) -> str:
    return f"{count} band{'s' if count != 1 else ''}"


def check_band_numbers(layer: QgsRasterLayer, bands: list[int]) -> None:
    """Raises when ``bands``, chosen in Processing's BANDS, name bands the layer does not have."""
    count = layer.bandCount()
    missing = [band for band in bands if not 1 <= band <= count]
    if missing:
        raise SegmentError(
            f"BANDS asks for band {missing[0]} but the layer {layer.name()} has {_plural(count)}",
            f"choose bands from 1 to {count}",
        )


def check_bands(
    layer: QgsRasterLayer, needed: int, bands: Optional[list[int]] = None, default: Optional[list[int]] = None
) -> list[int]:
    """The 1-based bands to read: ``bands`` (chosen in Processing's BANDS), else ``default`` (the model's
    ``ModelInfo.default_bands``), else the first ``needed``; raises when they do not fit the layer or model."""
    if bands:
        check_band_numbers(layer, bands)
        if len(bands) != needed:
            raise SegmentError(
                f"BANDS has {_plural(len(bands))} but the model reads {needed}",
                f"choose {needed} bands in BANDS, or leave it empty for the bands the model was trained on",
            )
        return list(bands)
    chosen = default or list(range(1, needed + 1))
    count = layer.bandCount()
    if count < max(chosen):
        raise SegmentError(
            f"The layer {layer.name()} has {_plural(count)}, the model needs {needed}",
            "choose a layer with the bands the model was trained on (e.g. RGB)",
        )
    return chosen


def check_input(
    layer: QgsRasterLayer, info: Any, bands: Optional[list[int]] = None, option: str = "BANDS"
) -> tuple[list[int], list[str]]:
    """The bands to read for model ``info`` (``check_bands``) and warnings when they, or the layer's data
    type, differ from the model's training rasters; ``option`` names the band choice for the user."""
    chosen = check_bands(layer, info.bands, bands, info.default_bands(layer.bandCount()))
    what = f"the layer {layer.name()}"
    dtype = _dtypes().get(layer.dataProvider().dataType(chosen[0]))
    notes = [info.band_warning(chosen, what, option), info.dtype_warning(dtype, what) if dtype else None]
    return chosen, [note for note in notes if note]


def read_bands(provider: QgsRasterDataProvider, window: ReadWindow, bands: list[int]) -> Any:
    """Raw bands (C, H, W) of the window; a masked array where the source has nodata (per band) or is
    transparent (alpha 0; QGIS also shows GDAL's per-dataset mask as an alpha band), as the backend reads it."""
    import numpy as np

    planes, masks = [], []
    for band in bands:
        block, data = _read_block(provider, band, window)
        dtype = data.dtype.name
        mask = None
        if block.hasNoDataValue():
            nodata = block.noDataValue()
            mask = np.isnan(data) if math.isnan(nodata) else data == np.asarray(nodata).astype(dtype)
        elif block.hasNoData():  # only a bitmap (pixels outside the raster, user nodata ranges)
            mask = _bitmap_mask(block, window, provider.extent())
        if dtype.startswith("float"):
            mask = np.isnan(data) if mask is None else (mask | np.isnan(data))
        planes.append(data)
        masks.append(mask)
    transparent = _transparent(provider, window)
    if transparent is not None:
        masks = [transparent if m is None else (m | transparent) for m in masks]
    stack = np.stack(planes)
    if all(m is None or not m.any() for m in masks):
        return stack
    full = np.stack([m if m is not None else np.zeros(stack.shape[1:], bool) for m in masks])
    return np.ma.MaskedArray(stack, full)


def _read_block(provider: QgsRasterDataProvider, band: int, window: ReadWindow) -> tuple[Any, Any]:
    """One band of the window: its QgsRasterBlock and its values as a numpy array (H, W)."""
    import numpy as np

    block = provider.block(band, window.extent, window.width, window.height)
    if block is None or not block.isValid():
        raise SegmentError(f"Band {band} could not be read", "check that the raster file is readable")
    dtype = _dtypes().get(block.dataType())
    if dtype is None:
        raise SegmentError(
            f"Band {band} has an unsupported data type ({block.dataType()})", "use integer or float bands"
        )
    return block, np.frombuffer(bytes(block.data()), dtype=dtype).reshape(window.height, window.width).copy()


def _transparent(provider: QgsRasterDataProvider, window: ReadWindow) -> Any:
    """Where the raster's alpha band is 0 (no imagery there), or None when it has no alpha band."""
    alpha = [b for b in range(1, provider.bandCount() + 1) if provider.colorInterpretation(b) == ALPHA_BAND]
    return _read_block(provider, alpha[0], window)[1] == 0 if alpha else None


def _bitmap_mask(block: Any, window: ReadWindow, raster: QgsRectangle) -> Any:
    """A block's nodata bitmap as a numpy mask: pixel by pixel when small (PyQGIS offers no bulk read),
    else the pixels whose centre lies outside the raster (the common case: the window's last partial pixel).
    """
    import numpy as np

    if window.width * window.height <= EXACT_MASK_PIXELS:
        flags = [block.isNoData(i) for i in range(window.width * window.height)]
        return np.array(flags, bool).reshape(window.height, window.width)
    px, py = window.pixel_size
    xs = window.extent.xMinimum() + (np.arange(window.width) + 0.5) * px
    ys = window.extent.yMaximum() - (np.arange(window.height) + 0.5) * py
    outside_x = (xs < raster.xMinimum()) | (xs > raster.xMaximum())
    outside_y = (ys < raster.yMinimum()) | (ys > raster.yMaximum())
    return outside_y[:, None] | outside_x[None, :]


def predict(
    model: Any,
    bands: Any,
    progress: Optional[Callable[[int, int], None]] = None,
    cancelled: Optional[Callable[[], bool]] = None,
    tta: bool = False,
) -> Any:
    """uint8 road probability (H, W), masked where nodata; None when cancelled. ``tta``: each tile's mean over
    its 8 flips and right-angle rotations (8x the time)."""
    return model.predict_array(bands, batch=4, progress=progress, cancelled=cancelled, tta=tta)


# ---------------------------------------------------------------------------------------------- output
def write_geotiff(path: str, values: Any, window: ReadWindow) -> str:
    """Write ``values`` ((H, W) or (C, H, W), any numeric dtype; masked = nodata) as a GeoTIFF on ``window``.

    Nodata becomes a GDAL per-dataset mask (inside the file), so every value, 0 included, keeps its
    meaning. Written under a temporary name and renamed at the end: no half-written output on failure.
    """
    import numpy as np
    from osgeo import gdal, gdal_array

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, f".{os.path.basename(path)}.partial.tif")
    data = np.ma.getdata(values)
    data = data[None] if data.ndim == 2 else data
    mask = np.ma.getmaskarray(values) if np.ma.isMaskedArray(values) else None
    if mask is not None and mask.ndim == 3:
        mask = mask.all(axis=0)  # nodata where no band has a value, as the engine reads it
    gdal_type = gdal_array.NumericTypeCodeToGDALTypeCode(data.dtype)
    gdal.SetThreadLocalConfigOption("GDAL_TIFF_INTERNAL_MASK", "YES")  # the mask inside the .tif, no .msk
    try:
        driver = gdal.GetDriverByName("GTiff")
        # MINISBLACK: GDAL would take 3 or 4 byte bands for RGB(A), and a 4th band (near infrared, say) for
        # alpha, masking wherever it is 0; transparency is the dataset mask below.
        multi = ["INTERLEAVE=PIXEL", "PHOTOMETRIC=MINISBLACK"] if len(data) > 1 else []
        options = ["COMPRESS=DEFLATE", "TILED=YES", *multi]
        dataset = driver.Create(partial, window.width, window.height, len(data), gdal_type, options)
        if dataset is None:
            raise SegmentError(f"Cannot write {path}: {gdal.GetLastErrorMsg()}", "choose a writable output file")
        dataset.SetGeoTransform(window.geotransform())
        dataset.SetProjection(window.crs.toWkt(WKT_PREFERRED_GDAL))
        for index, plane in enumerate(data, 1):
            dataset.GetRasterBand(index).WriteArray(plane)
        if mask is not None and mask.any():
            dataset.CreateMaskBand(gdal.GMF_PER_DATASET)
            dataset.GetRasterBand(1).GetMaskBand().WriteArray(np.where(mask, 0, 255).astype(np.uint8))
        dataset.FlushCache()
        dataset = None  # closes the file before the rename
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    finally:
        gdal.SetThreadLocalConfigOption("GDAL_TIFF_INTERNAL_MASK", None)
    return path


def place_file(source: str, target: str) -> str:
    """Move a finished output to ``target`` (copied then renamed across file systems: never half-written)."""
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, f".{os.path.basename(target)}.partial.tif")
    shutil.copyfile(source, partial)
    os.replace(partial, target)
    return target


def _backend_step(
    args: list[str],
    unavailable: tuple[str, str],
    progress: Optional[Callable[[int, int], None]] = None,
    cancelled: Optional[Callable[[], bool]] = None,
    log: Optional[Callable[[str], None]] = None,
    warn: Optional[Callable[[str], None]] = None,
    words: Optional[dict[str, str]] = None,
) -> Any:
    """``road-sslkd ARGS`` to the end (blocking: call it from a worker thread); its CliResult, None if cancelled.

    Progress, warnings and log lines go to the callbacks, and every text shown has the backend's ``words``
    replaced by the user's (scratch paths by layer names, options by parameters). ``unavailable`` is the
    (message prefix, hint) of the SegmentError raised when the backend cannot start.
    """
    from .cli import run_backend

    def in_user_terms(text: str) -> str:
        for cli_word, user_word in (words or {}).items():
            text = text.replace(cli_word, user_word)
        return text

    def on_event(event: dict) -> None:
        if event.get("event") == "progress" and event.get("total") and progress is not None:
            progress(int(event.get("step") or 0), int(event["total"]))
        elif event.get("event") == "warning" and warn is not None:
            warn(in_user_terms(str(event.get("message", ""))))

    try:
        result = run_backend(args, on_event, (lambda line: log(in_user_terms(line))) if log else None, cancelled)
    except (RuntimeError, OSError) as exc:
        raise SegmentError(f"{unavailable[0]}{exc}", unavailable[1]) from exc
    if cancelled is not None and cancelled():
        return None
    if not result.outcome.ok:
        raise SegmentError(in_user_terms(result.outcome.message), in_user_terms(result.outcome.hint))
    return result


def predict_with_backend(
    model_path: str,
    source: str,
    out_dir: str,
    source_name: str = "",
    progress: Optional[Callable[[int, int], None]] = None,
    cancelled: Optional[Callable[[], bool]] = None,
    log: Optional[Callable[[str], None]] = None,
    warn: Optional[Callable[[str], None]] = None,
    tta: bool = False,
    bands: Optional[list[int]] = None,
    options: Optional[dict[str, str]] = None,
) -> Optional[tuple[str, float]]:
    """``road-sslkd predict`` (backend venv) on a GeoTIFF written by ``write_geotiff``, for a QGIS whose
    Python lacks onnxruntime. Blocking: call it from a worker thread. The probability file and the model's road
    threshold (read by the backend from its metadata), None if cancelled.

    ``bands``: the source's bands to read (None: the model's default). The backend's messages and log name the
    user's layer (``source_name``) instead of the scratch copy, and ``options`` maps its command-line options
    to the caller's names for them (Processing: ``{"--bands": "BANDS"}``).
    """
    args = ["predict", model_path, source, "--out", out_dir, "--overwrite", *(["--tta"] if tta else [])]
    if bands:
        args += ["--bands", ",".join(map(str, bands))]
    words = {**({source: source_name} if source_name else {}), **(options or {})}
    result = _backend_step(args, ("", ENGINE_HINT), progress, cancelled, log, warn, words)
    if result is None:
        return None
    produced = result.artifact("probability")
    if not produced:
        raise SegmentError("road-sslkd predict wrote no probability raster", "its log has the details")
    done = next((e for e in reversed(result.events) if e.get("event") == "done"), {})
    return produced, float(done.get("threshold", 0.5))  # a backend older than the key used 0.5


def centrelines_with_backend(
    probability: str,
    out_path: str,
    threshold: float,
    spur_m: float,
    cancelled: Optional[Callable[[], bool]] = None,
    log: Optional[Callable[[str], None]] = None,
    warn: Optional[Callable[[str], None]] = None,
) -> bool:
    """``road-sslkd centrelines``: road centre lines of a probability GeoTIFF into the GeoPackage ``out_path``
    (the vectorisation of ``predict --vector``, which needs the backend's scikit-image and shapely). Blocking;
    False if cancelled. ``warn`` gets the backend's warnings (no CRS, no pixel at the threshold)."""
    args = ["centrelines", probability, "--out", out_path, "--threshold", repr(float(threshold)),
            "--spur-length", repr(float(spur_m)), "--overwrite"]
    # The backend's own message says how to set it up.
    unavailable = ("road centrelines are made by the backend: ", "")
    return _backend_step(args, unavailable, None, cancelled, log, warn) is not None


def binary_mask(probability: Any, threshold: float) -> Any:
    """Road (1) / background (0) at ``threshold`` (0..1), masked where the probability is; the rule of the
    backend's centrelines (a value of 0-255 counts when it is at least ``threshold * 255``)."""
    import numpy as np

    values = (np.ma.getdata(probability) >= threshold * 255).astype(np.uint8)
    if np.ma.isMaskedArray(probability):
        return np.ma.MaskedArray(values, np.ma.getmaskarray(probability))
    return values


# ---------------------------------------------------------------------------------------------- styles
def style_path(name: str) -> str:
    from ..resources import resource_path

    return resource_path(name)


PROBABILITY_STYLE = "road_probability.qml"
MASK_STYLE = "road_mask.qml"


def style_layer(layer: QgsRasterLayer, binary: bool = False) -> None:
    """The probability ramp (transparent near 0) or the red road mask, from resources/."""
    qml = style_path(MASK_STYLE if binary else PROBABILITY_STYLE)
    if qml:
        layer.loadNamedStyle(qml)
        layer.triggerRepaint()
