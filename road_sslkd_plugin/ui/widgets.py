"""Small widgets of the dock: labelled pairs, the unlabelled checklist, the stage strip, the banner."""

from __future__ import annotations

from typing import Callable, Optional

from qgis.core import QgsApplication, QgsMapLayer, QgsProject
from qgis.gui import QgsMapLayerComboBox
from qgis.PyQt.QtCore import QEvent, QPoint, QPointF, QRectF, QSize, Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor, QFont, QHelpEvent, QPainter, QPaintEvent, QPalette, QPen
from qgis.PyQt.QtWidgets import (
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QSizePolicy,
    QToolButton,
    QToolTip,
    QVBoxLayout,
    QWidget,
)

from ..core.layers import LayerInfo, Pair, describe, layer_filter
from ..core.protocol import run_stages, short_stage_label, stage_label

ACCENT = "#2b6cb0"
OK_GREEN = "#2f855a"


def theme_icon(name: str) -> object:
    return QgsApplication.getThemeIcon(name)


def muted_colour(widget: QWidget) -> QColor:
    """Text colour between the palette's text and window colours: readable in light and dark themes."""
    text, window = widget.palette().windowText().color(), widget.palette().window().color()
    return QColor(
        int(0.62 * text.red() + 0.38 * window.red()),
        int(0.62 * text.green() + 0.38 * window.green()),
        int(0.62 * text.blue() + 0.38 * window.blue()),
    )


def muted(label: QLabel, scale: float = 1.0) -> QLabel:
    """Style ``label`` as secondary text (hints, counts), optionally smaller."""
    palette = label.palette()
    palette.setColor(QPalette.ColorRole.WindowText, muted_colour(label))
    label.setPalette(palette)
    if scale != 1.0:
        font = QFont(label.font())
        font.setPointSizeF(label.font().pointSizeF() * scale)
        label.setFont(font)
    return label


class PairRow(QWidget):
    """One image combo, one label combo and a remove button; a note says when a chosen layer was removed."""

    changed = pyqtSignal()
    remove_requested = pyqtSignal(object)

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        # Connected before the combos exist, so it runs before their models drop the layer: a combo whose
        # layer vanishes moves on to the next layer in its list, which would silently swap the pair.
        QgsProject.instance().layersWillBeRemoved.connect(self._layers_removed)
        self._removed: dict[str, str] = {}  # "image" / "label": name of the layer removed from the project
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(1)
        layout = QHBoxLayout()
        layout.setSpacing(4)
        self.image = QgsMapLayerComboBox(self)
        self.image.setFilters(layer_filter("RasterLayer"))
        self.image.setAllowEmptyLayer(True)
        self.image.setLayer(None)
        self.image.setToolTip("Image (raster layer)")
        self.label = QgsMapLayerComboBox(self)
        self.label.setFilters(layer_filter("RasterLayer", "LineLayer", "PolygonLayer"))
        self.label.setAllowEmptyLayer(True)
        self.label.setLayer(None)
        self.label.setToolTip("Road labels: a raster mask (road > 0), or road lines/polygons")
        for combo in (self.image, self.label):
            combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
            combo.setMinimumContentsLength(8)
            combo.layerChanged.connect(self._changed)
        self.remove = QToolButton(self)
        self.remove.setIcon(theme_icon("/mActionRemove.svg"))
        self.remove.setToolTip("Remove this pair")
        self.remove.setAutoRaise(True)
        self.remove.clicked.connect(lambda: self.remove_requested.emit(self))
        layout.addWidget(self.image, 1)
        layout.addWidget(self.label, 1)
        layout.addWidget(self.remove)
        outer.addLayout(layout)
        self.note = QLabel(self)
        self.note.setWordWrap(True)
        self.note.hide()
        outer.addWidget(self.note)

    def _changed(self) -> None:
        image = self.image.currentLayer()
        self.label.setExceptedLayerList([image] if image is not None else [])
        # A side chosen again needs no note any more.
        self._removed = {
            side: name for side, name in self._removed.items() if getattr(self, side).currentLayer() is None
        }
        self._show_note()
        self.changed.emit()

    def _layers_removed(self, layer_ids: list[str]) -> None:
        """Empty the side whose layer leaves the project, and say so."""
        for side in ("image", "label"):
            combo: QgsMapLayerComboBox = getattr(self, side)
            layer = combo.currentLayer()
            if layer is not None and layer.id() in layer_ids:
                name = layer.name()
                combo.setLayer(None)
                self._removed[side] = name
        self._show_note()

    def _show_note(self) -> None:
        names = ", ".join(f"'{name}'" for name in self._removed.values())
        self.note.setText(f"Removed from the project: {names}. Choose again." if names else "")
        self.note.setVisible(bool(names))

    def pair(self) -> Pair:
        return Pair(self.image.currentLayer(), self.label.currentLayer())


class PairsEditor(QWidget):
    """A list of image/label pairs with an "Add pair" button; ``changed`` fires on every edit."""

    changed = pyqtSignal()

    def __init__(self, add_text: str = "Add pair", parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(3)
        header = QHBoxLayout()
        for text in ("Image", "Labels"):
            label = muted(QLabel(text, self), 0.9)
            header.addWidget(label, 1)
        header.addSpacing(26)
        outer.addLayout(header)
        self.rows_layout = QVBoxLayout()
        self.rows_layout.setSpacing(3)
        outer.addLayout(self.rows_layout)
        self.add_button = QToolButton(self)
        self.add_button.setText(add_text)
        self.add_button.setIcon(theme_icon("/mActionAdd.svg"))
        self.add_button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.add_button.setAutoRaise(True)
        self.add_button.clicked.connect(lambda: self.add_pair())
        outer.addWidget(self.add_button, 0, Qt.AlignmentFlag.AlignLeft)
        self.rows: list[PairRow] = []

    def add_pair(self, image: Optional[QgsMapLayer] = None, label: Optional[QgsMapLayer] = None) -> PairRow:
        row = PairRow(self)
        row.image.setLayer(image)
        row.label.setLayer(label)
        row.changed.connect(self.changed)
        row.remove_requested.connect(self.remove_pair)
        self.rows.append(row)
        self.rows_layout.addWidget(row)
        self._place_in_tab_order(row)
        self.changed.emit()
        return row

    def _place_in_tab_order(self, row: PairRow) -> None:
        """Tab reaches the row's controls where they are shown, just before the add button.

        A new widget joins the end of its window's focus chain, after the footer buttons made long before.
        """
        before = self.add_button.previousInFocusChain()
        while before is not self.add_button and (
            before.focusPolicy() == Qt.FocusPolicy.NoFocus or row.isAncestorOf(before)
        ):
            before = before.previousInFocusChain()
        for widget in (row.image, row.label, row.remove):
            QWidget.setTabOrder(before, widget)
            before = widget

    def remove_pair(self, row: PairRow) -> None:
        if row in self.rows:
            self.rows.remove(row)
            self.rows_layout.removeWidget(row)
            row.hide()  # deleteLater waits for the event loop; the row must vanish now
            row.deleteLater()
            self.changed.emit()

    def clear(self) -> None:
        for row in list(self.rows):
            self.remove_pair(row)

    def pairs(self) -> list[Pair]:
        return [row.pair() for row in self.rows]

    def set_pairs(self, pairs: list[Pair]) -> None:
        self.clear()
        for pair in pairs:
            self.add_pair(pair.image, pair.label)


class LayerChecklist(QListWidget):
    """Checkable raster layers: ones needing an export say so, unusable ones are disabled with a reason."""

    changed = pyqtSignal()

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(90)
        self.setAlternatingRowColors(True)
        self.setIconSize(QSize(16, 16))
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.itemChanged.connect(lambda _item: self.changed.emit())
        self._remembered: set[str] = set()

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt override
        return QSize(300, 120)

    def refresh(
        self,
        layers: list[QgsMapLayer],
        checked_ids: Optional[set[str]] = None,
        taken: Optional[dict[str, str]] = None,
    ) -> None:
        """Rebuild from ``layers``, keeping the current ticks (or setting ``checked_ids``).

        ``taken`` maps ids of layers already used elsewhere (in a labelled pair) to why: shown, not offered.
        """
        keep = self.checked_ids() | self._remembered if checked_ids is None else set(checked_ids)
        taken = taken or {}
        self._remembered = {i for i in keep if i in taken}  # ticked again once the layer is free
        self.blockSignals(True)
        self.clear()

        def order(layer: QgsMapLayer) -> int:  # offered layers first, then taken, then unusable ones
            return 1 if layer.id() in taken else (0 if describe(layer).usable else 2)

        for layer in sorted(layers, key=order):
            info: LayerInfo = describe(layer)
            item = QListWidgetItem(layer.name())
            item.setData(Qt.ItemDataRole.UserRole, layer.id())
            item.setIcon(theme_icon("/mIconRasterLayer.svg"))
            item.setToolTip(info.note())
            if layer.id() in taken:
                item.setFlags(Qt.ItemFlag.NoItemFlags)
                item.setText(f"{layer.name()}  ·  {taken[layer.id()]}")
            elif info.usable:
                item.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsUserCheckable)
                item.setCheckState(Qt.CheckState.Checked if layer.id() in keep else Qt.CheckState.Unchecked)
                if info.export:
                    item.setText(f"{layer.name()}  ·  {'web, exported' if info.export == 'web' else 'exported'}")
            else:
                item.setFlags(Qt.ItemFlag.NoItemFlags)
                item.setText(f"{layer.name()}  ·  {info.reason}")
            self.addItem(item)
        self.blockSignals(False)
        self.changed.emit()

    def checked_ids(self) -> set[str]:
        return {
            self.item(i).data(Qt.ItemDataRole.UserRole)
            for i in range(self.count())
            if self.item(i).checkState() == Qt.CheckState.Checked
        }

    def layer_ids(self) -> list[str]:
        return [self.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.count())]

    def checked_layers(self, project: Optional[QgsProject] = None) -> list[QgsMapLayer]:
        project = project or QgsProject.instance()
        ids = self.checked_ids()
        return [project.mapLayer(i) for i in self.layer_ids() if i in ids and project.mapLayer(i) is not None]

    def set_all(self, checked: bool, accept: Optional[Callable[[str], bool]] = None) -> None:
        """Tick (or untick) every offered layer; ``accept(layer_id)`` may leave some out when ticking."""
        for i in range(self.count()):
            item = self.item(i)
            if item.flags() & Qt.ItemFlag.ItemIsUserCheckable:
                tick = checked and (accept is None or accept(item.data(Qt.ItemDataRole.UserRole)))
                item.setCheckState(Qt.CheckState.Checked if tick else Qt.CheckState.Unchecked)


class StageStrip(QWidget):
    """The run's stages as a row of chips: done (green), current (blue), still to come (grey)."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.stages = run_stages()
        self.current: Optional[str] = None
        self.done: set[str] = set()
        self.setMinimumHeight(26)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt override
        return QSize(380, 26)

    def reset(self, stages: Optional[list[str]] = None) -> None:
        self.stages, self.current, self.done = run_stages(stages or []), None, set()
        self.update()

    def set_current(self, stage: str) -> None:
        if stage not in self.stages:  # a stage we did not expect (pretraining, say) runs now: after the current one
            self.stages.insert(self.stages.index(self.current) + 1 if self.current in self.stages else 0, stage)
        if self.current and self.current != stage:
            self.done.add(self.current)
        self.current = stage
        self.update()

    def finish(self, ok: bool) -> None:
        if ok:
            self.done = set(self.stages)
            self.current = None
        self.update()

    def chips(self) -> list[tuple[str, QRectF]]:
        """Each stage with its chip's rectangle: the strip's width shared out, 3 px apart."""
        gap = 3.0
        width = (self.width() - gap * (len(self.stages) - 1)) / max(len(self.stages), 1)
        return [
            (stage, QRectF(index * (width + gap), 2, width, self.height() - 4))
            for index, stage in enumerate(self.stages)
        ]

    def chip_tooltip(self, pos: QPoint) -> str:
        """The full name and state of the stage under ``pos`` (chips show a short name, elided when narrow)."""
        for number, (stage, rect) in enumerate(self.chips(), 1):
            if rect.contains(QPointF(pos)):
                state = "done" if stage in self.done else "running" if stage == self.current else "to come"
                return f"Stage {number} of {len(self.stages)}: {stage_label(stage)} ({state})"
        return ""

    def event(self, event: QEvent) -> bool:  # Qt override: one tooltip per chip
        if event.type() == QEvent.Type.ToolTip and isinstance(event, QHelpEvent):
            text = self.chip_tooltip(event.pos())
            if text:
                QToolTip.showText(event.globalPos(), text, self)
            else:
                QToolTip.hideText()
            return True
        return super().event(event)

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 - Qt override
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        font = QFont(self.font())
        font.setPointSizeF(max(6.5, self.font().pointSizeF() * 0.78))
        painter.setFont(font)
        text_colour = self.palette().text().color()
        for stage, rect in self.chips():
            text = short_stage_label(stage)
            if stage in self.done:
                fill, fg = QColor(OK_GREEN), QColor("white")
            elif stage == self.current:
                fill, fg = QColor(ACCENT), QColor("white")
            else:
                fill = QColor(text_colour)
                fill.setAlpha(22)
                fg = QColor(text_colour)
                fg.setAlpha(150)
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(fill)
            painter.drawRoundedRect(rect, 4, 4)
            painter.setPen(QPen(fg))
            elided = painter.fontMetrics().elidedText(text, Qt.TextElideMode.ElideRight, int(rect.width() - 4))
            painter.drawText(rect, Qt.AlignmentFlag.AlignCenter, elided)
        painter.end()


class Banner(QFrame):
    """A one-line coloured notice with optional buttons (backend state, problems before Start)."""

    STYLES = {
        "ok": ("#f0fff4", "#9ae6b4", "#22543d"),
        "warning": ("#fffaf0", "#fbd38d", "#7b341e"),
        "error": ("#fff5f5", "#feb2b2", "#742a2a"),
        "info": ("#ebf8ff", "#90cdf4", "#2a4365"),
    }

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setObjectName("banner")
        self.grid = QGridLayout(self)
        self.grid.setContentsMargins(8, 6, 8, 6)
        self.grid.setHorizontalSpacing(6)
        self.text = QLabel(self)
        self.text.setWordWrap(True)
        self.text.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.text.setOpenExternalLinks(True)
        self.grid.addWidget(self.text, 0, 0)
        self.buttons = QHBoxLayout()
        self.buttons.setSpacing(4)
        self.grid.addLayout(self.buttons, 1, 0, Qt.AlignmentFlag.AlignLeft)
        self.level = "info"

    def show_message(self, html: str, level: str = "info") -> None:
        self.level = level
        background, border, foreground = self.STYLES[level]
        self.setStyleSheet(
            f"QFrame#banner {{ background: {background}; border: 1px solid {border}; border-radius: 4px; }}"
            f"QFrame#banner QLabel {{ color: {foreground}; background: transparent; border: none; }}"
        )
        self.text.setText(html)
        self.setVisible(bool(html))

    def add_button(self, text: str, slot: Callable[[], None], icon: str = "") -> QToolButton:
        button = QToolButton(self)
        button.setText(text)
        if icon:
            button.setIcon(theme_icon(icon))
            button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        button.clicked.connect(slot)
        self.buttons.addWidget(button)
        return button
