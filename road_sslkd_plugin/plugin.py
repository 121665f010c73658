"""RoadSSLKDPlugin: a toolbar button, a menu entry, the dock panel and the Processing provider.

The dock (and with it everything that talks to the backend) is built on first use, so QGIS start-up
costs one action and one empty provider. ``unload`` removes all of it and stops a running training.
"""

from __future__ import annotations

from typing import Any, Optional

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from .resources import icon_path

MENU = "&Road SSLKD"


class RoadSSLKDPlugin:
    """The object QGIS's plugin manager creates through ``classFactory``."""

    def __init__(self, iface: Any) -> None:
        self.iface = iface
        self.action: Optional[QAction] = None
        self.dock: Any = None  # RoadSSLKDDock, imported lazily
        self.provider: Any = None

    def initProcessing(self) -> None:  # noqa: N802 - QGIS hook (also called by qgis_process)
        """Register the Processing provider (the segmentation algorithms land there next)."""
        if self.provider is not None:
            return
        from .provider import RoadSSLKDProvider

        self.provider = RoadSSLKDProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802 - QGIS hook
        self.initProcessing()
        self.action = QAction(QIcon(icon_path()), "Road SSLKD", self.iface.mainWindow())
        self.action.setObjectName("RoadSSLKDAction")
        self.action.setToolTip("Road SSLKD: train a road-segmentation student from labelled and unlabelled imagery")
        self.action.setCheckable(True)
        self.action.toggled.connect(self.show_dock)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToMenu(MENU, self.action)

    def show_dock(self, visible: bool = True) -> None:
        """Show or hide the dock, creating it on first use."""
        if self.dock is None:
            if not visible:
                return
            from .ui.dock import RoadSSLKDDock

            self.dock = RoadSSLKDDock(self.iface, parent=self.iface.mainWindow())
            self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
            # From here on QgsDockWidget keeps the button and the dock's visibility in step.
            self.action.toggled.disconnect(self.show_dock)
            self.dock.setToggleVisibilityAction(self.action)
        self.dock.setUserVisible(visible)

    def unload(self) -> None:
        """Remove everything initGui and the dock added; stop a running training (it stays resumable)."""
        if self.dock is not None:
            self.dock.shutdown()
            self.iface.removeDockWidget(self.dock)
            self.dock.setParent(None)
            self.dock.deleteLater()
            self.dock = None
        if self.action is not None:
            self.iface.removePluginMenu(MENU, self.action)
            self.iface.removeToolBarIcon(self.action)
            self.action.deleteLater()
            self.action = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
