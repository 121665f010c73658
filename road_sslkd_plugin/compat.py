"""Names that moved between QGIS 3.22, the 3.x LTRs and QGIS 4 (Qt6), resolved once where this QGIS has them.

QGIS 3.30-3.36 moved most enums into ``Qgis`` (``Qgis.DistanceUnit.Meters``), QGIS 4 dropped many of the
old spellings, and Qt6 moved ``QAction`` to QtGui; 3.22, the oldest QGIS supported, knows only the old ones.
"""

from typing import Any

import qgis.core

try:
    from qgis.PyQt.QtGui import QAction
except ImportError:  # Qt5
    from qgis.PyQt.QtWidgets import QAction

__all__ = ["QAction", "qgis_enum"]  # and the resolved values below


def qgis_enum(newer: str, older: str) -> Any:
    """The qgis.core value at the dotted path ``newer`` where this QGIS has it, else at ``older``."""
    for path in (newer, older):
        value: Any = qgis.core
        try:
            for part in path.split("."):
                value = getattr(value, part)
        except AttributeError:
            continue
        return value
    raise AttributeError(f"this QGIS has neither {newer} nor {older}")


DISTANCE_UNKNOWN = qgis_enum("Qgis.DistanceUnit.Unknown", "QgsUnitTypes.DistanceUnit.DistanceUnknownUnit")
DISTANCE_METERS = qgis_enum("Qgis.DistanceUnit.Meters", "QgsUnitTypes.DistanceUnit.DistanceMeters")
WKT_PREFERRED_GDAL = qgis_enum("Qgis.CrsWktVariant.PreferredGdal",
                               "QgsCoordinateReferenceSystem.WktVariant.WKT_PREFERRED_GDAL")
TASK_CAN_CANCEL = qgis_enum("Qgis.TaskFlag.CanCancel", "QgsTask.Flag.CanCancel")
SOURCE_RASTER = qgis_enum("Qgis.ProcessingSourceType.Raster", "QgsProcessing.SourceType.TypeRaster")
SOURCE_VECTOR_LINE = qgis_enum("Qgis.ProcessingSourceType.VectorLine", "QgsProcessing.SourceType.TypeVectorLine")
SOURCE_MAP_LAYER = qgis_enum("Qgis.ProcessingSourceType.MapLayer", "QgsProcessing.SourceType.TypeMapLayer")
NUMBER_INTEGER = qgis_enum("Qgis.ProcessingNumberParameterType.Integer", "QgsProcessingParameterNumber.Type.Integer")
NUMBER_DOUBLE = qgis_enum("Qgis.ProcessingNumberParameterType.Double", "QgsProcessingParameterNumber.Type.Double")
FILE_ONLY = qgis_enum("Qgis.ProcessingFileParameterBehavior.File", "QgsProcessingParameterFile.Behavior.File")
FOLDER_ONLY = qgis_enum("Qgis.ProcessingFileParameterBehavior.Folder", "QgsProcessingParameterFile.Behavior.Folder")
PARAMETER_ADVANCED = qgis_enum("Qgis.ProcessingParameterFlag.Advanced",
                               "QgsProcessingParameterDefinition.Flag.FlagAdvanced")
RASTER_SIZE = qgis_enum("Qgis.RasterInterfaceCapability.Size", "QgsRasterInterface.Capability.Size")
