"""What every Road SSLKD algorithm shares: its group, icon and how Processing makes new instances."""

from __future__ import annotations

from qgis.core import QgsProcessingAlgorithm
from qgis.PyQt.QtGui import QIcon

from ..resources import icon_path


class RoadAlgorithm(QgsProcessingAlgorithm):
    GROUP = "Training"

    def createInstance(self) -> RoadAlgorithm:  # noqa: N802 - Processing's API
        return type(self)()

    def group(self) -> str:
        return self.GROUP

    def groupId(self) -> str:  # noqa: N802
        return self.GROUP.lower()

    def icon(self) -> QIcon:
        return QIcon(icon_path())
