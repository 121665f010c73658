"""Qt names that moved between Qt5 (QGIS 3) and Qt6 (QGIS 4), imported from wherever this QGIS has them."""

try:  # Qt6 moved QAction from QtWidgets to QtGui
    from qgis.PyQt.QtGui import QAction
except ImportError:  # Qt5
    from qgis.PyQt.QtWidgets import QAction

__all__ = ["QAction"]
