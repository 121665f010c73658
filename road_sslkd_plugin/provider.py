"""The plugin's Processing provider (id ``road_sslkd``): registered and removed with the plugin.

Algorithms live in ``algorithms/``: ``road_sslkd:segment_roads``, ``road_sslkd:centrelines``,
``road_sslkd:train``, ``road_sslkd:resume_training``, ``road_sslkd:evaluate``.
"""

from __future__ import annotations

from qgis.core import QgsProcessingAlgorithm, QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .resources import icon_path


def algorithms() -> list[QgsProcessingAlgorithm]:
    """New instances of every algorithm the provider offers."""
    from .algorithms import all_algorithms

    return all_algorithms()


class RoadSSLKDProvider(QgsProcessingProvider):
    """Processing provider "Road SSLKD" (id ``road_sslkd``)."""

    def id(self) -> str:
        return "road_sslkd"

    def name(self) -> str:
        return "Road SSLKD"

    def icon(self) -> QIcon:
        return QIcon(icon_path())

    def loadAlgorithms(self) -> None:  # noqa: N802 - QGIS override
        for algorithm in algorithms():
            self.addAlgorithm(algorithm)

    def supportedOutputRasterLayerExtensions(self) -> list[str]:  # noqa: N802 - QGIS override
        # The algorithms write GeoTIFF only: the file dialog then offers no other format.
        return ["tif", "tiff"]

    def supportedOutputVectorLayerExtensions(self) -> list[str]:  # noqa: N802 - QGIS override
        return ["gpkg"]  # the backend writes centrelines as GeoPackage only
