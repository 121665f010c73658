"""End to end: the dock drives the real backend subprocess on a small generated dataset."""

import os
from pathlib import Path

import pytest

from conftest import REPO, add_demo_layers, needs_backend, wait_until
from road_sslkd_plugin.core import settings
from road_sslkd_plugin.core.backend import BackendLocator
from road_sslkd_plugin.core.layers import Pair
from road_sslkd_plugin.core.results import RunFolder
from road_sslkd_plugin.ui.dock import TAB_RESULTS, RoadSSLKDDock

pytestmark = needs_backend
TRAINING_TIMEOUT = 900  # seconds; the tiny preset takes about two minutes on two busy cores


@pytest.fixture
def dock(qgis_iface, project, demo_dir, tmp_path):
    layers = add_demo_layers(project, demo_dir)
    dock = RoadSSLKDDock(qgis_iface, locator=BackendLocator(plugin_dir=REPO / "road_sslkd_plugin", use_setting=False))
    dock.layers = layers
    dock.labelled.set_pairs(
        [
            Pair(layers["scene_000"], layers["scene_000 roads"]),  # vector centrelines, buffered by the backend
            Pair(layers["scene_001"], layers["scene_001 mask"]),  # raster mask
        ]
    )
    dock.select_unlabelled(True)  # "All": rasters with the labelled images' band count, so no masks
    dock.test_pairs.set_pairs([Pair(layers["scene_004"], layers["scene_004 mask"])])
    dock.label_width.setValue(6.0)
    dock.preset.setCurrentIndex(dock.preset.findData("tiny"))
    dock.output_folder.setFilePath(str(tmp_path / "runs"))
    dock.resize(440, 800)
    assert dock.backend.found, dock.backend.notes
    yield dock
    dock.shutdown()
    dock.deleteLater()


def test_tiny_training_finishes_with_onnx_and_results(dock):
    dock.steps_scale.setValue(0.5)
    dock.run_name.setText("tiny")
    stages = []
    dock.runner.backend_event.connect(lambda e: e["event"] == "progress" and stages.append(e.get("stage")))
    assert dock.start(), dock.notice.text.text()
    ticked = sorted(layer.name() for layer in dock.unlabelled.checked_layers())
    assert ticked == ["scene_002", "scene_003"]  # paired/test images and the spare mask are left out
    assert dock.runner.is_running() and not dock.start_button.isEnabled()
    assert wait_until(lambda: not dock.runner.is_running(), TRAINING_TIMEOUT), "training did not finish"
    outcome = dock.last_outcome
    assert outcome is not None and outcome.ok, (outcome.message, outcome.details())
    run = RunFolder(str(Path(dock.output_folder.filePath()) / "tiny"))
    assert run.onnx and os.path.getsize(run.onnx) > 1000
    assert {"teacher_a", "teacher_b", "teachers_ssl", "student_sslkd"} <= set(stages)
    assert dock.tabs.currentIndex() == TAB_RESULTS
    names = [dock.results_table.item(r, 0).text() for r in range(dock.results_table.rowCount())]
    assert "Student SSLKD" in names and "Teacher A" in names
    student = names.index("Student SSLKD")
    assert float(dock.results_table.item(student, 1).text()) >= 0.0  # IoU % on the test pair
    assert "IoU" in dock.summary.text() and dock.report.toPlainText()
    assert len(dock.chart.series.get("loss", [])) >= 4
    assert settings.project_value("last_run_state") == "done"
    assert not dock.resume_button.isVisibleTo(dock)
    dock.use_button.click()
    assert settings.selected_model() == run.onnx


def test_cancel_leaves_a_resumable_run(dock):
    dock.run_name.setText("cancelled")
    progressed = []
    dock.runner.backend_event.connect(lambda e: e["event"] == "progress" and progressed.append(e))
    assert dock.start(), dock.notice.text.text()
    assert wait_until(
        lambda: any(e.get("stage") == "teacher_a" and e.get("step", 0) >= 2 for e in progressed), TRAINING_TIMEOUT
    )
    dock.cancel_button.click()
    assert wait_until(lambda: not dock.runner.is_running(), 300), "the backend did not stop after SIGTERM"
    outcome = dock.last_outcome
    assert outcome.status == "cancelled" and outcome.exit_code == 143, (outcome.message, outcome.details())
    run_dir = Path(dock.output_folder.filePath()) / "cancelled"
    assert any((run_dir / "checkpoints").iterdir()), "no checkpoint written"
    assert dock.resume_button.isVisibleTo(dock) and dock.start_button.isEnabled()
    assert "Resume" in dock.notice.text.text()
    assert settings.project_value("last_run_state") == "cancelled"

    # Resume continues the same run folder from its checkpoint; stop it again to keep the test short.
    progressed.clear()
    assert dock.resume()
    assert not dock.resume_button.isVisibleTo(dock)
    assert wait_until(lambda: bool(progressed), TRAINING_TIMEOUT)
    assert progressed[0]["stage"] != "teacher_a" or progressed[0]["step"] > 0  # not from scratch
    dock.cancel()
    assert wait_until(lambda: not dock.runner.is_running(), 300)
    assert dock.last_outcome.status == "cancelled" and dock.resume_button.isVisibleTo(dock)
