"""``road_sslkd:centrelines``: road centre lines of a road probability raster, through ``road-sslkd centrelines``."""

from __future__ import annotations

from typing import Optional

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorDestination,
)

from ..compat import NUMBER_DOUBLE, SOURCE_VECTOR_LINE
from ..core import segment
from ..core.layers import describe
from .base import RoadAlgorithm
from .segment_roads import output_problem


class CentrelinesAlgorithm(RoadAlgorithm):
    GROUP = "Segmentation"
    INPUT = "INPUT"
    THRESHOLD = "THRESHOLD"
    SPUR = "SPUR_LENGTH"
    OUTPUT = "CENTRELINES"

    def name(self) -> str:
        return "centrelines"

    def displayName(self) -> str:  # noqa: N802
        return "Road centrelines from probability"

    def shortHelpString(self) -> str:  # noqa: N802
        return (
            "Road centre lines (a GeoPackage line layer with length_m) of a road probability raster: the "
            "skeleton of the pixels at or above the threshold, spurs shorter than the spur length pruned.<br><br>"
            "<b>Road probability</b>: a raster of 0-255 (255 = certainly road), as <i>Segment roads</i>, the "
            "map's <i>Segment Roads in Visible Extent</i> and <tt>road-sslkd predict</tt> write it; its file is "
            "read.<br>"
            "<b>Threshold</b>: 0-1 (default 0.5; a model's seg_thresh or the threshold of its road mask).<br>"
            "<b>Spur length</b> in metres (a raster without CRS: 20 px).<br>"
            "Made by the backend's <tt>road-sslkd centrelines</tt>: needs the backend (dock: Set up backend)."
        )

    def initAlgorithm(self, config: Optional[dict] = None) -> None:  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Road probability"))
        self.addParameter(QgsProcessingParameterNumber(
            self.THRESHOLD, "Road threshold", NUMBER_DOUBLE, defaultValue=0.5, minValue=0.001, maxValue=0.999))
        self.addParameter(QgsProcessingParameterNumber(
            self.SPUR, "Spur length to prune (metres)", NUMBER_DOUBLE, defaultValue=10.0, minValue=0.0))
        self.addParameter(QgsProcessingParameterVectorDestination(self.OUTPUT, "Road centrelines", SOURCE_VECTOR_LINE))

    def processAlgorithm(
        self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> dict:  # noqa: N802
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        source = describe(layer).path if layer is not None else None
        if not source:
            raise QgsProcessingException("The road probability must be a raster file (GeoTIFF) the backend can read: "
                                         "save the layer to a file first")
        output = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        problem = output_problem({self.OUTPUT: output}, source)
        if problem:
            raise QgsProcessingException(problem)
        threshold = self.parameterAsDouble(parameters, self.THRESHOLD, context)
        spur = self.parameterAsDouble(parameters, self.SPUR, context)
        try:
            if not segment.centrelines_with_backend(source, output, threshold, spur, feedback.isCanceled,
                                                    feedback.pushDebugInfo, feedback.pushWarning):
                return {}
        except segment.SegmentError as exc:
            raise QgsProcessingException(str(exc)) from exc
        return {self.OUTPUT: output}
