"""``road_sslkd:segment_roads``: road probability (and optionally a binary mask) of a raster with an ONNX model.

In-process with the shared ONNX engine when QGIS's Python has onnxruntime; otherwise the window is
handed to ``road-sslkd predict`` in the backend venv (``qgis_process`` and most QGIS installs lack
onnxruntime). Either way nothing is written until the prediction is complete.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingParameterBand,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsRasterLayer,
)

from ..compat import FILE_ONLY, NUMBER_DOUBLE
from ..core import segment, settings
from .base import RoadAlgorithm, advanced

MAX_PIXELS = 250_000_000  # whole rasters larger than this: `road-sslkd predict` streams them from disk


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
            "<b>Bands</b>: optional; the first bands the model takes by default.<br>"
            "<b>Road probability</b>: uint8 GeoTIFF, 0-255 (255 = certainly road), on the model's resolution "
            "grid aligned with the layer; nodata stays masked.<br>"
            "<b>Road mask</b>: optional; 1 = road where the probability reaches the threshold (default: the "
            "model's seg_thresh).<br>"
            "<b>Average 8 flips and rotations</b> (advanced): test-time augmentation, 8 times the time; about "
            "2 IoU points on the CIL 2016 benchmark.<br><br>"
            "Runs in QGIS when its Python has onnxruntime, else through the backend's <tt>road-sslkd predict</tt>, "
            "which reads the layer at its own resolution and, without a Threshold, masks at 0.5 (the model's "
            "metadata needs onnxruntime to read)."
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
            minValue=0.0,
            maxValue=1.0,
        )
        self.addParameter(threshold)
        self.addParameter(advanced(QgsProcessingParameterBoolean(
            self.TTA, "Average 8 flips and rotations of each tile (8x slower)", defaultValue=False
        )))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Road probability"))
        self.addParameter(
            QgsProcessingParameterRasterDestination(self.MASK, "Road mask", optional=True, createByDefault=False)
        )

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
            threshold = self.parameterAsDouble(parameters, self.THRESHOLD, context)
            if not 0.0 < threshold < 1.0:
                raise QgsProcessingException(f"The threshold must be between 0 and 1 (exclusive), not {threshold:g}")
        self._tta = self.parameterAsBoolean(parameters, self.TTA, context)
        output = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        mask_output = self.parameterAsOutputLayer(parameters, self.MASK, context) if parameters.get(self.MASK) else ""
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
        for warning in model.warnings:
            feedback.pushWarning(warning)
        chosen = segment.check_bands(layer, model.info.bands, bands)
        window = segment.plan_window(layer, extent, layer.crs(), model.info.resolution_cm, MAX_PIXELS)
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
        segment.write_geotiff(output, probability, window)
        if mask_output:
            segment.write_geotiff(mask_output, segment.binary_mask(probability, threshold), window)
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
        """The layer's window at its own resolution to a scratch GeoTIFF, then ``road-sslkd predict`` on it."""
        chosen = bands or list(range(1, layer.bandCount() + 1))  # the backend takes the first N it needs
        window = segment.plan_window(layer, extent, layer.crs(), None, MAX_PIXELS)
        with tempfile.TemporaryDirectory(prefix="road_sslkd_") as scratch:
            source = os.path.join(scratch, "window.tif")
            segment.write_geotiff(source, segment.read_bands(self._provider, window, chosen), window)
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
            )
            if produced is None:
                return None
            threshold = 0.5 if threshold is None else threshold  # the model's own needs onnxruntime to read
            segment.place_file(produced, output)
            if mask_output:
                segment.write_geotiff(mask_output, segment.binary_mask(_read(output), threshold), window)
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


def _read(path: str) -> Any:
    import numpy as np
    from osgeo import gdal

    dataset = gdal.Open(path)  # kept in a variable: a band outliving its dataset crashes GDAL
    band = dataset.GetRasterBand(1)
    valid = band.GetMaskBand().ReadAsArray() > 0
    values = np.ma.MaskedArray(band.ReadAsArray(), ~valid)
    dataset = None
    return values
