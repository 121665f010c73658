"""The plugin's Processing provider: registered and removed with the plugin.

Hook for the segmentation algorithms (next issue): add them to ``algorithms()``; the provider, its
registration in ``RoadSSLKDPlugin.initProcessing`` and its removal on unload are already in place.
"""

from __future__ import annotations

from qgis.core import QgsProcessingAlgorithm, QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .resources import icon_path


def algorithms() -> list[QgsProcessingAlgorithm]:
    """New instances of every algorithm the provider offers."""
    return []


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
