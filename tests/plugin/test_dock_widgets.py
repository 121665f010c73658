"""The dock's small widgets on their own: the stage strip's chips."""

from qgis.PyQt.QtCore import QEvent, QPoint
from qgis.PyQt.QtGui import QHelpEvent
from qgis.PyQt.QtWidgets import QApplication, QToolTip

from road_sslkd_plugin.core.protocol import TRAIN_STAGES, stage_label
from road_sslkd_plugin.ui.widgets import StageStrip


def test_each_stage_chip_tells_its_full_name(qgis_iface):
    """With baselines on the chips are too narrow for their names: hovering one names its stage."""
    strip = StageStrip()
    strip.reset(list(TRAIN_STAGES))
    strip.resize(340, 26)
    strip.show()
    strip.set_current("teacher_b")
    strip.set_current("teachers_ssl")
    chips = strip.chips()
    assert len(chips) == 8 and chips[-1][0] == "export"
    third = chips[2][1].center().toPoint()
    assert strip.chip_tooltip(third) == f"Stage 3 of 8: {stage_label('teachers_ssl')} (running)"
    assert strip.chip_tooltip(chips[1][1].center().toPoint()).endswith("Teacher B (done)")
    assert strip.chip_tooltip(QPoint(-5, 10)) == ""

    last = chips[6][1].center().toPoint()
    QApplication.sendEvent(strip, QHelpEvent(QEvent.Type.ToolTip, last, strip.mapToGlobal(last)))
    assert QToolTip.text() == f"Stage 7 of 8: {stage_label(TRAIN_STAGES[-1])} (to come)"
    QToolTip.hideText()
    strip.hide()
