"""What every Road SSLKD algorithm shares: its group, icon and how Processing makes new instances."""

from __future__ import annotations

from qgis.core import QgsProcessingAlgorithm, QgsProcessingParameterDefinition
from qgis.PyQt.QtGui import QIcon

from ..compat import PARAMETER_ADVANCED
from ..resources import icon_path


def advanced(parameter: QgsProcessingParameterDefinition) -> QgsProcessingParameterDefinition:
    """Shown under Advanced Parameters."""
    parameter.setFlags(parameter.flags() | PARAMETER_ADVANCED)
    return parameter


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

    def svgIconPath(self) -> str:  # noqa: N802 - the modeler draws this one, not icon()
        return icon_path()

    def tags(self) -> list[str]:
        return ["roads", "road extraction", "segmentation", "deep learning", "onnx", "semi-supervised",
                "knowledge distillation", "sslkd"]
