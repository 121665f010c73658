"""A live training chart drawn with QPainter: losses on the left axis, IoU (0-100 %) on the right.

Each backend stage restarts its step counter, so stages are laid side by side on the x axis and
separated by a labelled line. No plotting dependency: QGIS ships Qt, and that is enough.
"""

from __future__ import annotations

import math
from typing import Optional

from qgis.PyQt.QtCore import QPointF, QRectF, QSize, Qt
from qgis.PyQt.QtGui import QColor, QFont, QPainter, QPainterPath, QPaintEvent, QPen
from qgis.PyQt.QtWidgets import QSizePolicy, QWidget

from ..core.protocol import short_stage_label

LOSS_COLOURS = ["#2b6cb0", "#9f7aea", "#38a169", "#dd6b20", "#718096", "#d53f8c"]
IOU_COLOUR = "#e53e3e"


def is_iou(name: str) -> bool:
    return name.endswith("iou")


class TrainingChart(QWidget):
    """Call ``add_metric(name, value, stage, step)`` for every metric event; ``clear()`` for a new run."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(170)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.clear()

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt override
        return QSize(380, 220)

    def clear(self) -> None:
        self.series: dict[str, list[tuple[float, float]]] = {}
        self.stage_starts: list[tuple[float, str]] = []
        self._offsets: dict[str, float] = {}
        self._last_x = 0.0
        self._counts: dict[tuple[str, str], int] = {}
        self.update()

    def add_metric(self, name: str, value: Optional[float], stage: Optional[str], step: Optional[float]) -> None:
        """Add one point; ``step`` None counts points per stage and metric instead."""
        if value is None or not math.isfinite(value) or not (name.startswith("loss") or is_iou(name)):
            return
        stage = stage or ""
        if stage not in self._offsets:
            start = self._last_x + (1.0 if self._offsets else 0.0)
            self._offsets[stage] = start
            self.stage_starts.append((start, stage))
        if step is None:
            key = (stage, name)
            self._counts[key] = self._counts.get(key, 0) + 1
            step = self._counts[key]
        x = self._offsets[stage] + float(step)
        self._last_x = max(self._last_x, x)
        self.series.setdefault(name, []).append((x, float(value)))
        self.update()

    def _colour(self, name: str) -> QColor:
        if is_iou(name):
            return QColor(IOU_COLOUR)
        losses = [n for n in self.series if not is_iou(n)]
        return QColor(LOSS_COLOURS[losses.index(name) % len(LOSS_COLOURS)])

    def _loss_range(self) -> tuple[float, float]:
        values = sorted(v for name, points in self.series.items() if not is_iou(name) for _, v in points)
        if not values:
            return 0.0, 1.0
        # The 98th percentile keeps the first, huge losses from flattening everything else.
        top = values[min(len(values) - 1, int(0.98 * len(values)))]
        low = min(0.0, values[0])
        top = _nice_ceiling(max(top, low + 1e-6))
        return low, top

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 - Qt override
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        palette = self.palette()
        painter.fillRect(self.rect(), palette.base())
        small = QFont(self.font())
        small.setPointSizeF(max(6.5, self.font().pointSizeF() * 0.82))
        painter.setFont(small)
        metrics = painter.fontMetrics()
        text_colour = palette.text().color()
        muted = QColor(text_colour)
        muted.setAlpha(140)

        legend = self._legend_layout(metrics, 6.0, self.width() - 6.0)
        legend_h = (max((y for _, _, y in legend), default=0.0) + 1) * (metrics.height() + 3) + 4
        plot = QRectF(
            metrics.horizontalAdvance("0.000") + 10,
            legend_h + 6,
            self.width() - metrics.horizontalAdvance("100%") - metrics.horizontalAdvance("0.000") - 22,
            self.height() - legend_h - metrics.height() - 14,
        )
        if not self.series:
            painter.setPen(muted)
            painter.drawText(  # wrapped: a narrow dock would cut one long line at both ends
                QRectF(self.rect()).adjusted(8, 0, -8, 0),
                int(Qt.AlignmentFlag.AlignCenter) | int(Qt.TextFlag.TextWordWrap),
                "Losses and validation IoU appear here during training",
            )
            painter.end()
            return

        x_max = max(self._last_x, 1.0)
        x_min = min(start for start, _ in self.stage_starts) if self.stage_starts else 0.0
        low, top = self._loss_range()

        def px(x: float) -> float:
            return plot.left() + (x - x_min) / max(x_max - x_min, 1e-9) * plot.width()

        def py_loss(v: float) -> float:
            v = min(max(v, low), top)
            return plot.bottom() - (v - low) / (top - low) * plot.height()

        def py_iou(v: float) -> float:
            return plot.bottom() - min(max(v, 0.0), 1.0) * plot.height()

        # Grid and axes
        grid = QColor(text_colour)
        grid.setAlpha(30)
        for i in range(5):
            y = plot.bottom() - i * plot.height() / 4
            painter.setPen(QPen(grid, 1))
            painter.drawLine(QPointF(plot.left(), y), QPointF(plot.right(), y))
            painter.setPen(muted)
            loss_text = _fmt_axis(low + i * (top - low) / 4)
            painter.drawText(
                QRectF(0, y - metrics.height() / 2, plot.left() - 5, metrics.height()),
                Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
                loss_text,
            )
            painter.drawText(
                QRectF(plot.right() + 5, y - metrics.height() / 2, 60, metrics.height()),
                Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter,
                f"{25 * i}%",
            )

        # Stage separators and names
        for index, (start, stage) in enumerate(self.stage_starts):
            x = px(start)
            if index:
                pen = QPen(muted, 1, Qt.PenStyle.DashLine)
                painter.setPen(pen)
                painter.drawLine(QPointF(x, plot.top()), QPointF(x, plot.bottom()))
            # the last stage's name may run into the right margin: it has no neighbour there
            end = px(self.stage_starts[index + 1][0]) if index + 1 < len(self.stage_starts) else self.width()
            painter.setPen(muted)
            name = metrics.elidedText(short_stage_label(stage), Qt.TextElideMode.ElideRight, int(max(end - x - 6, 0)))
            painter.drawText(
                QRectF(x + 3, plot.bottom() + 2, max(end - x - 3, 0), metrics.height()),
                Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop,
                name,
            )

        # Series: one path per stage, so lines never jump across a stage boundary
        for name, points in self.series.items():
            colour = self._colour(name)
            iou = is_iou(name)
            width = 2.0 if name in ("loss",) or iou else 1.3
            painter.setPen(QPen(colour, width))
            to_y = py_iou if iou else py_loss
            path = QPainterPath()
            previous_stage = None
            for x, v in points:
                stage = self._stage_at(x)
                point = QPointF(px(x), to_y(v))
                if stage != previous_stage:
                    path.moveTo(point)
                    previous_stage = stage
                else:
                    path.lineTo(point)
            painter.drawPath(path)
            if iou:  # validation points are sparse: mark them
                painter.setBrush(colour)
                for x, v in points:
                    painter.drawEllipse(QPointF(px(x), to_y(v)), 2.5, 2.5)
                painter.setBrush(Qt.BrushStyle.NoBrush)

        painter.setPen(QPen(grid, 1))
        painter.drawRect(plot)

        # Legend, wrapped over as many lines as the width needs
        line_h = metrics.height() + 3
        for name, x, line in legend:
            y = 4 + line * line_h + line_h / 2
            painter.setPen(QPen(self._colour(name), 3))
            painter.drawLine(QPointF(x, y), QPointF(x + 14, y))
            painter.setPen(text_colour)
            painter.drawText(QPointF(x + 18, y + metrics.ascent() / 2 - 1), _legend_text(name))
        painter.end()

    def _legend_layout(self, metrics: object, left: float, right: float) -> list[tuple[str, float, int]]:
        """(series, x, line) for each legend entry: total loss first, IoU last."""
        entries, x, line = [], left, 0
        for name in sorted(self.series, key=lambda n: (is_iou(n), n != "loss", n)):
            width = 18 + metrics.horizontalAdvance(_legend_text(name)) + 12
            if x + width > right and x > left:
                x, line = left, line + 1
            entries.append((name, x, line))
            x += width
        return entries

    def _stage_at(self, x: float) -> str:
        current = ""
        for start, stage in self.stage_starts:
            if x >= start:
                current = stage
        return current


def _legend_text(name: str) -> str:
    return name.replace("_", " ") + (" (right axis)" if is_iou(name) else "")


def _nice_ceiling(value: float) -> float:
    """A round number (1, 1.5, 2 ... 8 times a power of ten) at least ``value``: tidy axis labels."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for factor in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if factor * power >= value:
            return factor * power
    return 10 * power


def _fmt_axis(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 10:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.1f}"
    return f"{value:.2f}"
