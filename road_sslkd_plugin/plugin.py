"""RoadSSLKDPlugin: toolbar buttons, menu entries, the dock panel and the Processing provider.

The dock, the segmenter and the ONNX engine are built on first use, so QGIS start-up costs a few actions
and the provider. ``unload`` removes all of it and stops a running training or segmentation.
"""

from __future__ import annotations

from typing import Any, Optional

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon, QKeySequence

from .compat import QAction
from .resources import icon_path, segment_icon_path

MENU = "&Road SSLKD"
SEGMENT_SHORTCUT = "Ctrl+Alt+R"


class RoadSSLKDPlugin:
    """The object QGIS's plugin manager creates through ``classFactory``."""

    def __init__(self, iface: Any) -> None:
        self.iface = iface
        self.action: Optional[QAction] = None
        self.dock: Any = None  # RoadSSLKDDock, imported lazily
        self.provider: Any = None
        self.segment_action: Optional[QAction] = None
        self.model_action: Optional[QAction] = None
        self.keep_action: Optional[QAction] = None
        self.lines_action: Optional[QAction] = None
        self.segmenter: Any = None  # ExtentSegmenter, imported lazily

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
        self._init_segment_actions()

    def _init_segment_actions(self) -> None:
        """"Segment visible extent" (toolbar, menu, Ctrl+Alt+R), "Choose road model…" and two checkable user
        settings: "Keep earlier results", "Draw road centrelines"."""
        from .ui.segment_extent import KEEP_KEY, LINES_KEY, draw_centrelines, keep_results

        window = self.iface.mainWindow()
        self.segment_action = QAction(QIcon(segment_icon_path()), "Segment Roads in Visible Extent", window)
        self.segment_action.setObjectName("RoadSSLKDSegmentAction")
        self.segment_action.setToolTip(
            f"Road SSLKD: segment roads in the visible map extent of the active (or topmost) image layer "
            f"({SEGMENT_SHORTCUT})"
        )
        self.segment_action.triggered.connect(self.segment_visible_extent)
        self.segment_action.setShortcut(QKeySequence(SEGMENT_SHORTCUT))
        register = getattr(self.iface, "registerMainWindowAction", None)
        if register is not None:  # QGIS: listed (and changeable) in Settings > Keyboard Shortcuts
            register(self.segment_action, SEGMENT_SHORTCUT)
        self.model_action = QAction("Choose Road Model…", window)
        self.model_action.setObjectName("RoadSSLKDChooseModelAction")
        self.model_action.triggered.connect(lambda: self._segmenter().choose_model())
        self.keep_action = _setting_action("Keep Earlier Segmentations", "RoadSSLKDKeepAction", KEEP_KEY,
                                           keep_results(), window)
        self.lines_action = _setting_action("Draw Road Centrelines", "RoadSSLKDCentrelinesAction", LINES_KEY,
                                            draw_centrelines(), window)
        self.lines_action.setToolTip(
            "Road SSLKD: also draw the road centre lines of each segmentation (made by the backend)"
        )
        self.iface.addToolBarIcon(self.segment_action)
        for action in (self.segment_action, self.model_action, self.keep_action, self.lines_action):
            self.iface.addPluginToMenu(MENU, action)

    def _segmenter(self) -> Any:
        if self.segmenter is None:
            from .ui.segment_extent import ExtentSegmenter

            self.segmenter = ExtentSegmenter(self.iface)
        return self.segmenter

    def segment_visible_extent(self) -> bool:
        """Segment the canvas extent with the chosen model; False when it could not start (message shown)."""
        return self._segmenter().run()

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
            if self.segment_action is not None:
                self.dock.add_segment_action(self.segment_action)
        self.dock.setUserVisible(visible)

    def unload(self) -> None:
        """Remove everything initGui and the dock added; stop a running training (it stays resumable)."""
        if self.dock is not None:
            self.dock.shutdown()
            self.iface.removeDockWidget(self.dock)
            self.dock.setParent(None)
            self.dock.deleteLater()
            self.dock = None
        if self.segmenter is not None:
            self.segmenter.shutdown()
            self.segmenter = None
        for action in (self.segment_action, self.model_action, self.keep_action, self.lines_action):
            if action is not None:
                self.iface.removePluginMenu(MENU, action)
                if action is self.segment_action:
                    self.iface.removeToolBarIcon(action)
                    unregister = getattr(self.iface, "unregisterMainWindowAction", None)
                    if unregister is not None:
                        unregister(action)
                action.deleteLater()
        self.segment_action = self.model_action = self.keep_action = self.lines_action = None
        if self.action is not None:
            self.iface.removePluginMenu(MENU, self.action)
            self.iface.removeToolBarIcon(self.action)
            self.action.deleteLater()
            self.action = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None


def _setting_action(text: str, name: str, key: str, checked: bool, parent: Any) -> QAction:
    """A checkable menu action that is the user setting ``key`` ("true"/"false")."""
    from .core import settings

    action = QAction(text, parent)
    action.setObjectName(name)
    action.setCheckable(True)
    action.setChecked(checked)
    action.toggled.connect(lambda on: settings.set_user_value(key, "true" if on else "false"))
    return action
