"""``road_sslkd:segment_roads``: road probability (and optionally a binary mask) of a raster with an ONNX model.

In-process with the shared ONNX engine when QGIS's Python has onnxruntime; otherwise the window is
handed to ``road-sslkd predict`` in the backend venv (``qgis_process`` and most QGIS installs lack
onnxruntime). Either way the outputs are checked before any work and nothing is written until the
prediction is complete.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Optional

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingOutputLayerDefinition,
    QgsProcessingParameterBand,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorDestination,
    QgsRasterLayer,
)

from ..compat import FILE_ONLY, NUMBER_DOUBLE, SOURCE_VECTOR_LINE
from ..core import segment, settings
from ..core.layers import describe, writable_folder_problem
from .base import RoadAlgorithm, advanced

MAX_PIXELS = 250_000_000  # read into memory at most (here, or copied for the backend); whole files stream
# What each output is written as, whatever name it is given: (extensions, format name).
GEOTIFF = ((".tif", ".tiff"), "GeoTIFF")
FORMATS = {"OUTPUT": GEOTIFF, "MASK": GEOTIFF, "CENTRELINES": ((".gpkg",), "GeoPackage")}
BACKEND_OPTIONS = {"--bands": "BANDS"}  # `road-sslkd predict` options in the backend's messages -> parameters


class _Styler(QgsProcessingLayerPostProcessorInterface):
    """Applies the plugin's QML to an output layer loaded into the project."""

    def __init__(self, binary: bool) -> None:
        super().__init__()
        self.binary = binary

    def postProcessLayer(self, layer: Any, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> None:  # noqa: N802
        if isinstance(layer, QgsRasterLayer):
            segment.style_layer(layer, self.binary)


_STYLERS: list[_Styler] = []  # Processing keeps only a C++ pointer: Python must keep the objects alive


class SegmentRoadsAlgorithm(RoadAlgorithm):
    GROUP = "Segmentation"
    INPUT = "INPUT"
    MODEL = "MODEL"
    EXTENT = "EXTENT"
    BANDS = "BANDS"
    THRESHOLD = "THRESHOLD"
    TTA = "TTA"
    OUTPUT = "OUTPUT"
    MASK = "MASK"
    CENTRELINES = "CENTRELINES"
    SPUR = "SPUR_LENGTH"

    def __init__(self) -> None:
        super().__init__()
        self._layer: Optional[QgsRasterLayer] = None
        self._provider: Any = None
        self._styles: dict[str, bool] = {}  # written output path -> binary style
        self._tta = False

    def name(self) -> str:
        return "segment_roads"

    def displayName(self) -> str:  # noqa: N802
        return "Segment roads"

    def shortHelpString(self) -> str:  # noqa: N802
        return (
            "Road probability of a raster layer with a Road SSLKD student (or any Deepness-compatible ONNX "
            "segmentation model).<br><br>"
            "<b>Model</b>: an .onnx file; tile size, overlap, normalisation and ground resolution come from "
            'its metadata. The default is the model chosen with "Use this model" in the dock.<br>'
            "<b>Extent</b>: optional; only that part of the layer is segmented (any CRS).<br>"
            "<b>Bands</b>: optional; by default the bands the model was trained on (from its metadata) where "
            "the layer has them, else its first bands. A warning says when the bands, or the layer's data type, "
            "differ from the training imagery.<br>"
            "<b>Road probability</b>: uint8 GeoTIFF (.tif), 0-255 (255 = certainly road); nodata stays masked. "
            "It must not be the input layer's file.<br>"
            "<b>Road mask</b>: optional GeoTIFF (.tif); 1 = road where the probability reaches the threshold "
            "(default: the model's seg_thresh).<br>"
            "<b>Road centrelines</b>: optional GeoPackage (.gpkg) of road centre lines with their length_m: the "
            "skeleton of the road mask (same threshold), spurs shorter than the advanced <i>spur length</i> "
            "(metres) pruned. Made by the backend's <tt>road-sslkd centrelines</tt>, so it needs the backend.<br>"
            "<b>Average 8 flips and rotations</b> (advanced): test-time augmentation, 8 times the time; about "
            "2 IoU points on the CIL 2016 benchmark.<br><br>"
            "Runs in QGIS when its Python has onnxruntime: the layer is read at the model's ground resolution and "
            "the outputs lie on that grid, aligned with the layer. Otherwise through the backend's "
            "<tt>road-sslkd predict</tt>: the layer's file (segmented whole, of any size) or a copy of its "
            f"EXTENT (up to {MAX_PIXELS / 1e6:g} Mpx) goes to the backend at the layer's own resolution, "
            "the backend resamples them to the model's resolution, and the outputs come back on the layer's own "
            "grid; without a Threshold the mask is cut at the model's threshold, which the backend reads."
        )

    def initAlgorithm(self, config: Optional[dict] = None) -> None:  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Raster layer"))
        model = QgsProcessingParameterFile(
            self.MODEL, "Road model (ONNX)", FILE_ONLY, "onnx"
        )
        chosen = settings.selected_model()
        if chosen:
            model.setDefaultValue(chosen)
        self.addParameter(model)
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Extent (default: the whole layer)", optional=True))
        self.addParameter(
            QgsProcessingParameterBand(self.BANDS, "Bands", None, self.INPUT, optional=True, allowMultiple=True)
        )
        threshold = QgsProcessingParameterNumber(
            self.THRESHOLD,
            "Road threshold for the mask (default: the model's)",
            NUMBER_DOUBLE,
            optional=True,
            minValue=0.001,  # 0 and 1 would mark every pixel road, or none
            maxValue=0.999,
        )
        self.addParameter(threshold)
        self.addParameter(advanced(QgsProcessingParameterBoolean(
            self.TTA, "Average 8 flips and rotations of each tile (8x slower)", defaultValue=False
        )))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Road probability"))
        self.addParameter(
            QgsProcessingParameterRasterDestination(self.MASK, "Road mask", optional=True, createByDefault=False)
        )
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.CENTRELINES, "Road centrelines", SOURCE_VECTOR_LINE, optional=True, createByDefault=False
        ))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            self.SPUR, "Centreline spur length to prune (metres)", NUMBER_DOUBLE, defaultValue=10.0, minValue=0.0
        )))

    # ------------------------------------------------------------------ run
    def prepareAlgorithm(
        self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> bool:  # noqa: N802
        """Main thread: a private copy of the layer's provider, read later from the algorithm's thread."""
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException("The input raster layer cannot be opened")
        self._layer = layer
        self._provider = layer.dataProvider().clone()
        return True

    def processAlgorithm(
        self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> dict:  # noqa: N802
        layer = self._layer
        model_path = self.parameterAsFile(parameters, self.MODEL, context)
        extent = None
        if parameters.get(self.EXTENT) not in (None, ""):
            extent = self.parameterAsExtent(parameters, self.EXTENT, context, layer.crs())
        bands = self.parameterAsInts(parameters, self.BANDS, context) or None
        threshold = None
        if parameters.get(self.THRESHOLD) not in (None, ""):
            threshold = self.parameterAsDouble(parameters, self.THRESHOLD, context)  # in range: Processing checks
        self._tta = self.parameterAsBoolean(parameters, self.TTA, context)
        output = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        optional = {name: self.parameterAsOutputLayer(parameters, name, context)
                    for name in (self.MASK, self.CENTRELINES) if _given(parameters, name)}
        mask_output = optional.get(self.MASK, "")
        lines_output = optional.get(self.CENTRELINES, "")
        problem = output_problem({self.OUTPUT: output, **optional}, describe(layer).path)
        if problem:
            raise QgsProcessingException(problem)
        if lines_output:
            from ..core.cli import backend_command

            try:
                backend_command()  # before any work: the centrelines need it at the end
            except RuntimeError as exc:
                raise QgsProcessingException(f"CENTRELINES are made by the backend: {exc}") from exc
        try:
            if segment.engine_available():
                threshold = self._in_process(layer, model_path, extent, bands, threshold, output, mask_output, feedback)
            else:
                feedback.pushInfo("onnxruntime is not available in QGIS's Python: running `road-sslkd predict`.")
                threshold = self._with_backend(
                    layer, model_path, extent, bands, threshold, output, mask_output, feedback
                )
        except segment.SegmentError as exc:
            raise QgsProcessingException(str(exc)) from exc
        if threshold is None:  # cancelled
            return {}
        results = {self.OUTPUT: output}
        self._styles = {os.path.normpath(output): False}
        if mask_output:
            results[self.MASK] = mask_output
            self._styles[os.path.normpath(mask_output)] = True
        if lines_output:
            feedback.pushInfo(f"Centrelines of the road mask at threshold {threshold:g}")
            spur = self.parameterAsDouble(parameters, self.SPUR, context)
            try:
                if not segment.centrelines_with_backend(output, lines_output, threshold, spur, feedback.isCanceled,
                                                        feedback.pushDebugInfo, feedback.pushWarning):
                    return {}
            except segment.SegmentError as exc:
                raise QgsProcessingException(f"CENTRELINES: {exc}") from exc
            results[self.CENTRELINES] = lines_output
        return results

    def _in_process(
        self,
        layer: QgsRasterLayer,
        model_path: str,
        extent: Any,
        bands: Optional[list[int]],
        threshold: Optional[float],
        output: str,
        mask_output: str,
        feedback: QgsProcessingFeedback,
    ) -> Optional[float]:
        model = segment.load_model(model_path)
        chosen, notes = segment.check_input(layer, model.info, bands)
        window = segment.plan_window(layer, extent, layer.crs(), model.info.resolution_cm, MAX_PIXELS)
        for warning in [*model.warnings, *notes, segment.resolution_note(layer, model.info, window)]:
            if warning:
                feedback.pushWarning(warning)
        feedback.pushInfo(f"Reading {window.width} x {window.height} pixels, bands {chosen}")
        pixels = segment.read_bands(self._provider, window, chosen)
        probability = segment.predict(
            model,
            pixels,
            progress=lambda done, total: feedback.setProgress(100.0 * done / max(total, 1)),
            cancelled=feedback.isCanceled,
            tta=self._tta,
        )
        if probability is None:
            return None
        threshold = model.info.threshold if threshold is None else threshold
        _write(self.OUTPUT, output, lambda: segment.write_geotiff(output, probability, window))
        if mask_output:
            mask = segment.binary_mask(probability, threshold)
            _write(self.MASK, mask_output, lambda: segment.write_geotiff(mask_output, mask, window))
        return threshold

    def _with_backend(
        self,
        layer: QgsRasterLayer,
        model_path: str,
        extent: Any,
        bands: Optional[list[int]],
        threshold: Optional[float],
        output: str,
        mask_output: str,
        feedback: QgsProcessingFeedback,
    ) -> Optional[float]:
        """``road-sslkd predict`` on the layer's file when it is segmented whole, else on its window copied at
        its own resolution to a scratch GeoTIFF (at most MAX_PIXELS: the copy is made in memory).

        The backend streams a file from disk, whatever its size. The scratch copy keeps the layer's band numbers
        (all its bands, or up to the last one chosen), so the backend's default (the model's training bands) and
        its messages speak of the layer's own bands.
        """
        if bands:
            segment.check_band_numbers(layer, bands)  # the rest is checked where the model's metadata is read
        source_file = describe(layer).path
        whole = bool(source_file) and (extent is None or extent.contains(layer.extent()))
        window = segment.plan_window(layer, None if whole else extent, layer.crs(), None,
                                     None if whole else MAX_PIXELS)
        with tempfile.TemporaryDirectory(prefix="road_sslkd_") as scratch:
            source = source_file if whole else os.path.join(scratch, "window.tif")
            if not whole:
                copied = list(range(1, (max(bands) if bands else layer.bandCount()) + 1))
                segment.write_geotiff(source, segment.read_bands(self._provider, window, copied), window)
            produced = segment.predict_with_backend(
                model_path,
                source,
                scratch,
                f"the layer {layer.name()}",
                progress=lambda done, total: feedback.setProgress(100.0 * done / max(total, 1)),
                cancelled=feedback.isCanceled,
                log=feedback.pushDebugInfo,
                warn=feedback.pushWarning,
                tta=self._tta,
                bands=bands,
                options=BACKEND_OPTIONS,
            )
            if produced is None:
                return None
            produced, model_threshold = produced
            threshold = model_threshold if threshold is None else threshold
            _write(self.OUTPUT, output, lambda: segment.place_file(produced, output))
            if mask_output:
                mask = segment.binary_mask(_read(output), threshold)
                _write(self.MASK, mask_output, lambda: segment.write_geotiff(mask_output, mask, window))
        return threshold

    def postProcessAlgorithm(self, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> dict:  # noqa: N802
        """Main thread: the probability ramp and the mask style on outputs loaded into the project."""
        for layer_id in list(context.layersToLoadOnCompletion()):
            binary = self._styles.get(os.path.normpath(layer_id))
            if binary is not None:
                styler = _Styler(binary)
                _STYLERS.append(styler)
                context.layerToLoadOnCompletionDetails(layer_id).setPostProcessor(styler)
        return {}


def _given(parameters: dict, name: str) -> bool:
    """Whether an optional output was asked for: batch mode passes an empty definition for "skip", and
    reading it as an output would queue an empty layer to load."""
    value = parameters.get(name)
    if isinstance(value, QgsProcessingOutputLayerDefinition):
        value = value.sink.staticValue()
    return bool(value)


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)  # links and case-insensitive file systems included
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def output_problem(outputs: dict[str, str], source: Optional[str]) -> str:
    """Why the output files (parameter -> path) cannot be written, before any work: names not of their format
    (FORMATS), an unwritable folder, the input layer's own file or two outputs in one file; '' when they can."""
    for name, path in outputs.items():
        base, extension = os.path.splitext(path)
        extensions, kind = FORMATS[name]
        if extension.lower() not in extensions:
            return (f"{name} {path} is not a {kind} name: the output is a {kind}, so give it the {extensions[0]} "
                    f"extension ({os.path.basename(base)}{extensions[0]})")
        folder = writable_folder_problem(os.path.dirname(os.path.abspath(path)))
        if folder:
            return f"{name}: {folder}"
        if source and _same_file(path, source):
            return f"{name} is the input layer's file {source}: writing it would destroy the image; choose another file"
    named = list(outputs.items())
    for index, (first, path) in enumerate(named):
        for second, other in named[index + 1:]:
            if _same_file(path, other):
                return f"{first} and {second} are both {path}: the second would replace the first; choose two files"
    return ""


def _write(parameter: str, path: str, write: Callable[[], Any]) -> None:
    """``write()`` the output of ``parameter``; a disk or folder failure becomes a Processing error."""
    try:
        write()
    except OSError as exc:
        raise QgsProcessingException(f"{parameter}: cannot write {path}: {exc.strerror or exc}") from exc


def _read(path: str) -> Any:
    import numpy as np
    from osgeo import gdal

    dataset = gdal.Open(path)  # kept in a variable: a band outliving its dataset crashes GDAL
    band = dataset.GetRasterBand(1)
    valid = band.GetMaskBand().ReadAsArray() > 0
    values = np.ma.MaskedArray(band.ReadAsArray(), ~valid)
    dataset = None
    return values
