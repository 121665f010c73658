"""The dock panel with real layers, settings, backend states and real subprocesses."""

import json
import select
import socket
import sys
import time
from pathlib import Path

import pytest
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsVectorLayer
from qgis.PyQt.QtCore import Qt
from test_backend_setup import write_backend
from test_layers import XYZ, line_layer, write_raster

from conftest import REPO, needs_backend, wait_until
from road_sslkd_plugin.core import settings
from road_sslkd_plugin.core.backend import (
    BACKEND_PYTHON_VARIABLE,
    BackendLocator,
    BackendStatus,
    checkout_venv_dir,
    venv_python,
)
from road_sslkd_plugin.core.layers import Pair
from road_sslkd_plugin.core.protocol import TRAIN_STAGES, stage_label
from road_sslkd_plugin.core.runner import TrainingRunner
from road_sslkd_plugin.ui.dock import RoadSSLKDDock, absolute_folder
from road_sslkd_plugin.ui.widgets import StageStrip


@pytest.fixture
def layers(tmp_path, project):
    made = {
        "scene A": QgsRasterLayer(write_raster(tmp_path / "a.tif"), "scene A", "gdal"),
        "scene B": QgsRasterLayer(write_raster(tmp_path / "b.tif", x0=500100.0), "scene B", "gdal"),
        "mask A": QgsRasterLayer(write_raster(tmp_path / "ma.tif", bands=1), "mask A", "gdal"),
        "roads A": line_layer("roads A"),
        "trees": QgsVectorLayer("Point?crs=EPSG:32633", "trees", "memory"),
        "OpenStreetMap": QgsRasterLayer(XYZ, "OpenStreetMap", "wms"),
    }
    project.addMapLayers(list(made.values()))
    return made


@pytest.fixture
def make_dock(qgis_iface):
    docks = []

    def make(locator=None):
        dock = RoadSSLKDDock(qgis_iface, locator=locator)
        docks.append(dock)
        return dock

    yield make
    for dock in docks:
        dock.shutdown()
        dock.deleteLater()


def missing_backend(tmp_path):
    """A locator whose three places are all empty: no setting, no checkout venv, no managed venv."""
    return BackendLocator(plugin_dir=tmp_path / "plugin" / "road_sslkd_plugin", profile_venv=tmp_path / "venv")


def combo_names(combo):
    return [combo.itemText(i) for i in range(combo.count()) if combo.itemText(i)]


def test_dock_lists_the_projects_layers(layers, make_dock, tmp_path):
    dock = make_dock(missing_backend(tmp_path))
    row = dock.labelled.rows[0]
    assert combo_names(row.image) == ["OpenStreetMap", "mask A", "scene A", "scene B"]
    assert combo_names(row.label) == ["OpenStreetMap", "mask A", "roads A", "scene A", "scene B"]  # no points
    assert row.image.currentLayer() is None and row.label.currentLayer() is None

    checklist = dock.unlabelled
    texts = [checklist.item(i).text() for i in range(checklist.count())]
    assert texts == ["scene A", "scene B", "mask A", "OpenStreetMap  ·  web, exported"]
    assert "visible map extent" in checklist.item(3).toolTip()

    row.image.setLayer(layers["scene A"])
    row.label.setLayer(layers["roads A"])
    assert combo_names(row.label) == ["OpenStreetMap", "mask A", "roads A", "scene B"]  # not its own image
    texts = [checklist.item(i).text() for i in range(checklist.count())]
    assert texts[-1] == "scene A  ·  image of a labelled pair"  # shown last, not offered
    assert not checklist.item(checklist.count() - 1).flags() & Qt.ItemFlag.ItemIsUserCheckable
    assert dock.label_width.isEnabled() and dock.label_width.suffix() == " m"

    # a layer added later shows up at once
    extra = QgsRasterLayer(write_raster(tmp_path / "c.tif"), "scene C", "gdal")
    QgsProject.instance().addMapLayer(extra)
    assert "scene C" in [checklist.item(i).text() for i in range(checklist.count())]
    assert "scene C" in combo_names(row.image)


def test_settings_are_remembered_per_project_and_per_user(layers, make_dock, tmp_path):
    dock = make_dock(missing_backend(tmp_path))
    dock.labelled.set_pairs([Pair(layers["scene A"], layers["mask A"])])
    dock.unlabelled.set_all(False)
    dock.unlabelled.findItems("scene B", Qt.MatchFlag.MatchExactly)[0].setCheckState(Qt.CheckState.Checked)
    dock.preset.setCurrentIndex(dock.preset.findData("cpu"))
    dock.steps_scale.setValue(0.5)
    dock.output_folder.setFilePath(str(tmp_path / "runs"))
    dock.baselines.setChecked(True)
    dock.weights.setCurrentIndex(dock.weights.findData("pretrain"))
    assert dock.current_plan().weights == "pretrain"  # `train --weights pretrain`: encoders from these layers
    dock.save_settings()
    project_file = str(tmp_path / "project.qgz")
    assert QgsProject.instance().write(project_file)

    QgsProject.instance().clear()
    assert dock.preset.currentData() == "cpu"  # a new project starts from the user's defaults
    assert dock.labelled.pairs()[0].image is None

    assert QgsProject.instance().read(project_file)
    restored = make_dock(missing_backend(tmp_path))
    for view in (dock, restored):
        pair = view.labelled.pairs()[0]
        assert pair.image.name() == "scene A" and pair.label.name() == "mask A"
        assert [layer.name() for layer in view.unlabelled.checked_layers()] == ["scene B"]
        assert view.preset.currentData() == "cpu" and view.steps_scale.value() == 0.5
        assert view.output_folder.filePath() == str(tmp_path / "runs") and view.baselines.isChecked()
        assert view.current_plan().weights == "pretrain"


def test_a_typed_relative_output_folder_is_next_to_the_project(layers, make_dock, tmp_path):
    assert QgsProject.instance().write(str(tmp_path / "project.qgz"))
    dock = make_dock(missing_backend(tmp_path))
    dock.output_folder.setFilePath("runs")
    assert dock.current_plan().output_folder == str(tmp_path / "runs")
    assert absolute_folder(str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")


def test_missing_backend_offers_set_up(layers, make_dock, tmp_path):
    settings.set_user_value(settings.BACKEND_PYTHON_KEY, str(tmp_path / "nowhere" / "python"))
    dock = make_dock(missing_backend(tmp_path))
    assert not dock.backend.found
    assert dock.backend_banner.isVisibleTo(dock)
    assert "No training backend found" in dock.backend_banner.text.text()
    assert str(tmp_path / "nowhere" / "python") in dock.backend_banner.text.text()  # says what was tried
    assert dock.setup_button.isVisibleTo(dock) and dock.setup_button.text() == "Set up backend"
    assert dock.choose_button.isVisibleTo(dock)

    dock.labelled.set_pairs([Pair(layers["scene A"], layers["mask A"])])
    dock.output_folder.setFilePath(str(tmp_path / "runs"))
    assert dock.start() is False
    assert "No training backend" in dock.notice.text.text() and dock.notice.isVisibleTo(dock)
    assert not dock.runner.is_running()


@needs_backend
def test_found_backend_reports_its_version(make_dock):
    dock = make_dock(BackendLocator(plugin_dir=REPO / "road_sslkd_plugin", use_setting=False))
    assert dock.backend.found and dock.backend.source == "checkout" and dock.backend.version
    assert "ready" in dock.backend_banner.text.text()
    assert not dock.setup_button.isVisibleTo(dock)


@needs_backend
def test_the_environment_names_the_backend_for_headless_use(monkeypatch, tmp_path):
    python = str(venv_python(checkout_venv_dir(REPO / "road_sslkd_plugin")))
    elsewhere = {"plugin_dir": tmp_path / "plugin" / "road_sslkd_plugin", "profile_venv": tmp_path / "venv"}
    monkeypatch.setenv(BACKEND_PYTHON_VARIABLE, python)
    status = BackendLocator(**elsewhere).find()
    assert status.found and status.source == "environment" and status.python == python
    monkeypatch.setenv(BACKEND_PYTHON_VARIABLE, str(tmp_path / "none" / "python"))
    status = BackendLocator(**elsewhere).find()
    assert not status.found and BACKEND_PYTHON_VARIABLE in status.notes[0]


@needs_backend
def test_start_explains_what_is_missing_and_overwrites_nothing(layers, make_dock, tmp_path):
    dock = make_dock(BackendLocator(plugin_dir=REPO / "road_sslkd_plugin", use_setting=False))
    dock.output_folder.setFilePath(str(tmp_path / "runs"))
    assert dock.start() is False
    assert "Add at least one labelled pair" in dock.notice.text.text()

    dock.labelled.set_pairs([Pair(layers["scene B"], layers["mask A"])])  # B lies east of mask A
    dock.run_name.setText("mine")
    existing = tmp_path / "runs" / "mine"
    existing.mkdir(parents=True)
    (existing / "notes.txt").write_text("keep me")
    assert dock.start() is False
    text = dock.notice.text.text()
    assert "do not overlap" in text and "already holds files" in text
    assert not dock.runner.is_running()
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]
    assert (existing / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "runs" / "mine.inputs").exists()


def run_process(dock, code, tmp_path):
    """Run a real Python process through the dock's runner, as if it were the backend."""
    dock.runner.start([sys.executable, "-c", code], [], str(tmp_path / "run"))
    dock.runner.finished.connect(lambda outcome: setattr(dock, "_test_outcome", outcome))
    assert wait_until(lambda: hasattr(dock, "_test_outcome"), 60)
    return dock._test_outcome


def test_backend_crash_shows_stderr_tail_and_exit_code(make_dock, tmp_path):
    dock = make_dock(missing_backend(tmp_path))
    code = (
        "import sys, json\n"
        "print(json.dumps({'event': 'progress', 'stage': 'teacher_a', 'step': 1, 'total': 4, 'eta': 3}))\n"
        "sys.stderr.write('Traceback (most recent call last):\\nValueError: bad tile\\n')\n"
        "print(json.dumps({'event': 'error', 'message': 'ValueError: bad tile', 'hint': 'a bug'}))\n"
        "sys.exit(1)\n"
    )
    outcome = run_process(dock, code, tmp_path)
    assert outcome.status == "crash" and outcome.exit_code == 1
    text = dock.notice.text.text()
    assert "ValueError: bad tile" in text and "exit code 1" in text and "Traceback" in text
    assert "Traceback (most recent call last):" in dock.log.toPlainText()
    assert dock.start_button.isEnabled() and not dock.resume_button.isVisibleTo(dock)


def test_kill_by_the_system_reads_as_out_of_memory(make_dock, tmp_path):
    dock = make_dock(missing_backend(tmp_path))
    outcome = run_process(dock, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", tmp_path)
    assert outcome.status == "killed"
    assert "probably out of memory" in dock.notice.text.text()
    assert "smaller preset" in dock.notice.text.text()


@needs_backend
def test_backend_user_error_is_shown_with_its_hint(make_dock, tmp_path):
    dock = make_dock(BackendLocator(plugin_dir=REPO / "road_sslkd_plugin", use_setting=False))
    missing = str(tmp_path / "missing.tif")
    dock.runner.start(
        dock.backend.command(),
        ["train", "--out", str(tmp_path / "run"), "--preset", "tiny", "--labelled", f"{missing}:{missing}"],
        str(tmp_path / "run"),
    )
    assert wait_until(lambda: dock.last_outcome is not None, 180)
    assert dock.last_outcome.status == "user_error" and dock.last_outcome.exit_code == 2
    assert dock.notice.isVisibleTo(dock) and dock.last_outcome.message in dock.notice.text.text()


def test_set_up_backend_reports_pip_failures(make_dock, tmp_path):
    broken = tmp_path / "broken_backend"
    broken.mkdir()
    (broken / "pyproject.toml").write_text("[project\nname = \n")  # not even TOML
    dock = make_dock(missing_backend(tmp_path))
    dock.start_backend_setup(tmp_path / "venv", broken, sys.executable)
    assert dock.setup_progress.isVisibleTo(dock) and not dock.setup_button.isEnabled()
    assert wait_until(lambda: dock.installer is None, 300)
    text = dock.notice.text.text()
    assert "Setting up the backend failed" in text and "exit code" in text
    assert "TOMLDecodeError" in text and "TOMLDecodeError" in dock.log.toPlainText()  # pip's own words
    assert (tmp_path / "venv").is_dir()  # the venv step ran; pip's step failed
    assert dock.setup_button.isEnabled() and not dock.backend.found


def test_set_up_backend_runs_once_and_a_cancel_is_no_failure(make_dock, tmp_path, own_pip):
    """A second Set up while pip runs is ignored; Cancel says the set-up was cancelled, not that it failed."""
    source = write_backend(tmp_path / "backend", "2.0", dependency="torch")
    dock = make_dock(missing_backend(tmp_path))
    with socket.create_server(("127.0.0.1", 0)) as silent:  # an index that never answers: pip waits on it
        index = ["--index-url", f"http://127.0.0.1:{silent.getsockname()[1]}"]
        dock.start_backend_setup(tmp_path / "venv", source, sys.executable, pip_args=index)
        first = dock.installer
        assert wait_until(lambda: select.select([silent], [], [], 0)[0], 120), "pip never asked the index"
        dock.start_backend_setup(tmp_path / "venv", source, sys.executable, pip_args=index)
        assert dock.installer is first and first.is_running()
        dock.cancel()
        assert wait_until(lambda: dock.installer is None, 60)
    text = dock.notice.text.text()
    assert "Set-up cancelled" in text and "failed" not in text
    assert dock.setup_button.isEnabled() and not dock.backend.found


def test_results_of_a_run_folder(make_dock, tmp_path, qgis_iface):
    run = tmp_path / "run-1"
    run.mkdir()
    metrics = {
        "models": {
            "teacher_a": {"iou": 0.61, "f1": 0.75, "params": 11_259_177},
            "teacher_b_ssl": {"iou": 0.64, "f1": 0.78, "params": 11_249_921},
            "student_sslkd": {"iou": 0.58, "f1": 0.73, "params": 2_238_473, "mpx_per_s": 12.5},
        }
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "report.md").write_text("# Road SSLKD run\n\nGood roads.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    (run / "student.onnx").write_bytes(b"placeholder")
    dock = make_dock(missing_backend(tmp_path))
    dock.run_dir = str(run)
    dock.load_results(str(run))
    table = dock.results_table
    assert table.rowCount() == 3
    assert [table.item(r, 0).text() for r in range(3)] == ["Teacher A", "Teacher B + SSL", "Student SSLKD"]
    assert table.item(2, 1).text() == "58.0" and table.item(2, 4).text() == "12.5"
    assert "58.0 %" in dock.summary.text() and "fewer parameters" in dock.summary.text()
    assert "Good roads" in dock.report.toPlainText() and "| a |" not in dock.report.toPlainText()

    chosen = []
    dock.model_selected.connect(chosen.append)
    dock.use_button.click()
    assert chosen == [str(run / "student.onnx")]
    assert settings.selected_model() == str(run / "student.onnx")
    assert settings.project_value(settings.MODEL_KEY) == str(run / "student.onnx")
    assert dock.use_button.text() == "In use for segmentation"


def test_open_run_shows_a_finished_run_and_offers_resume_for_another(make_dock, tmp_path):
    """Open run…: a run from Processing, the command line or another machine becomes the project's run."""
    finished, stopped = tmp_path / "finished", tmp_path / "stopped"
    for folder in (finished, stopped):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    (finished / "metrics.json").write_text(json.dumps({"models": {"student_sslkd": {"iou": 0.6, "f1": 0.7}}}))
    (finished / "student.onnx").write_bytes(b"placeholder")
    dock = make_dock(missing_backend(tmp_path))
    dock.on_event({"event": "metric", "name": "loss", "value": 0.9, "stage": "teacher_a", "step": 1})
    dock.on_event({"event": "progress", "stage": "teacher_a", "step": 5, "total": 8, "eta": 75})
    assert dock.open_run(str(finished))
    # The Run tab no longer shows the earlier run: a Resume would have drawn on its chart and written to its log.
    assert dock.chart.series == {} and not dock.log.toPlainText() and dock.status_label.text() == "Finished"
    assert dock.results_table.rowCount() == 1 and dock.use_button.isEnabled()
    assert settings.project_value("last_run_dir") == str(finished) and not dock.resume_button.isVisibleTo(dock)
    assert dock.open_run(str(stopped))
    assert dock.results_table.rowCount() == 0 and "did not finish" in dock.notice.text.text()
    assert dock.resume_button.isVisibleTo(dock) and settings.project_value("last_run_state") == "cancelled"
    assert not dock.open_run(str(tmp_path))  # no config.json
    assert "not a Road SSLKD run folder" in dock.notice.text.text() and dock.run_dir == str(stopped)


def test_chart_takes_metric_events(make_dock, tmp_path):
    dock = make_dock(missing_backend(tmp_path))
    for step, loss in enumerate([1.2, 0.9, 0.7], 1):
        dock.on_event({"event": "metric", "name": "loss", "value": loss, "stage": "teacher_a", "step": step})
    dock.on_event({"event": "metric", "name": "fit_iou", "value": 0.4, "stage": "teacher_a", "step": 3})
    dock.on_event({"event": "metric", "name": "loss", "value": 2.0, "stage": "teacher_b", "step": 1})
    dock.on_event({"event": "metric", "name": "test_iou", "value": 0.5, "stage": "teacher_a", "step": None})
    chart = dock.chart
    assert [x for x, _ in chart.series["loss"]] == [1, 2, 3, 5]  # teacher_b starts after teacher_a
    assert [stage for _, stage in chart.stage_starts] == ["teacher_a", "teacher_b"]
    assert "test_iou" not in chart.series and "Teacher A: test iou = 50.0 %" in dock.log.toPlainText()
    dock.on_event({"event": "metric", "name": "mpx_per_s_int8", "value": 3.524, "stage": "student_sslkd", "step": None})
    dock.on_event({"event": "metric", "name": "threshold", "value": 0.5, "stage": "student_sslkd", "step": None})
    assert "mpx per s int8 = 3.52 Mpx/s" in dock.log.toPlainText() and "threshold = 0.500" in dock.log.toPlainText()
    dock.on_event({"event": "progress", "stage": "teacher_b", "step": 2, "total": 8, "eta": 75})
    assert dock.progress.value() == 2 and dock.progress.maximum() == 8
    assert dock.eta_label.text() == "1 min 15 s left" and dock.status_label.text() == "Teacher B · step 2 of 8"
    assert Path(dock.grab().save(str(tmp_path / "dock.png")) and tmp_path / "dock.png").is_file()


def test_stage_strip_places_pretraining_first(qgis_iface):
    strip = StageStrip()
    for stage in ("pretrain_resnet34", "pretrain_mobilenet_v2", "teacher_a"):
        strip.set_current(stage)
    assert strip.stages[:3] == ["pretrain_resnet34", "pretrain_mobilenet_v2", "teacher_a"]
    assert strip.stages[-1] == "export" and strip.done == {"pretrain_resnet34", "pretrain_mobilenet_v2"}
    assert stage_label("pretrain_resnet34") == "Pretraining resnet34"


def finished_run(folder: Path) -> Path:
    """A run folder as the results tab reads it (metrics, a placeholder model file)."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {"models": {"student_sslkd": {"iou": 0.5, "f1": 0.6, "params": 1000}}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "student.onnx").write_bytes(b"placeholder")
    return folder


FAKE_TRAINING = """
import json, os, sys, time
from pathlib import Path
run, go = Path(sys.argv[1]), Path(sys.argv[2])
print(json.dumps({"event": "progress", "stage": "teacher_a", "step": 1, "total": 2}), flush=True)
while not go.exists():
    time.sleep(0.05)
run.mkdir(parents=True, exist_ok=True)
(run / "metrics.json").write_text(json.dumps({"models": {"student_sslkd": {"iou": 0.5, "f1": 0.6, "params": 1}}}))
(run / "student.onnx").write_bytes(b"placeholder")
print(json.dumps({"event": "done"}), flush=True)
"""


def fake_backend(tmp_path: Path) -> BackendStatus:
    """A backend interpreter whose `road-sslkd RUN GO` waits for the file GO, then writes a finished RUN."""
    bin_dir = tmp_path / "fake-venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    code = tmp_path / "fake_training.py"
    code.write_text(FAKE_TRAINING)
    script = bin_dir / "road-sslkd"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{code}" "$@"\n')
    script.chmod(0o755)
    return BackendStatus(python=str(bin_dir / "python"), source="setting", version="fake")


def test_a_run_that_ends_in_another_project_changes_nothing_there(make_dock, tmp_path):
    project = QgsProject.instance()
    run_a, run_b, go = tmp_path / "run-a", finished_run(tmp_path / "run-b"), tmp_path / "go"
    dock = make_dock(missing_backend(tmp_path))
    dock.backend = fake_backend(tmp_path)
    project.clear()
    settings.set_project_value("last_run_dir", str(run_b))
    settings.set_project_value("last_run_state", "done")
    assert project.write(str(tmp_path / "b.qgz"))
    project.clear()
    events = []
    dock.runner.backend_event.connect(events.append)
    dock._start_process([str(run_a), str(go)], str(run_a), fresh=True)
    assert wait_until(lambda: bool(events), 60)
    assert project.write(str(tmp_path / "a.qgz"))  # saved while running, as QGIS asks before a switch

    assert project.read(str(tmp_path / "b.qgz"))
    assert dock.run_dir == str(run_a)  # the run in progress stays on screen
    go.touch()
    assert wait_until(lambda: not dock.runner.is_running(), 60)
    assert dock.last_outcome.ok
    assert settings.project_value("last_run_dir") == str(run_b)
    assert settings.project_value("last_run_state") == "done"
    assert "another project" in dock.notice.text.text()
    assert dock.run_dir == str(run_b)
    dock.use_button.click()
    assert settings.selected_model() == str(run_b / "student.onnx")

    # Its own project still says "running": the finished run shows its results and offers no Resume.
    assert project.read(str(tmp_path / "a.qgz"))
    assert dock.run_dir == str(run_a) and dock.results_table.rowCount() == 1
    assert not dock.resume_button.isVisibleTo(dock)


def test_layers_loading_with_the_project_do_not_overwrite_its_setup(layers, make_dock, tmp_path):
    dock = make_dock(missing_backend(tmp_path))
    dock.labelled.set_pairs([Pair(layers["scene A"], layers["mask A"])])
    dock.save_settings()
    project_file = str(tmp_path / "project.qgz")
    assert QgsProject.instance().write(project_file)
    QgsProject.instance().clear()

    def slow_layer(*_args):  # a network layer keeps the event loop running while the project loads
        wait_until(lambda: False, 0.6)

    QgsProject.instance().layersAdded.connect(slow_layer)
    try:
        assert QgsProject.instance().read(project_file)
    finally:
        QgsProject.instance().layersAdded.disconnect(slow_layer)
    pair = dock.labelled.pairs()[0]
    assert pair.image is not None and pair.image.name() == "scene A"


def fake_checkpoint(seconds: float) -> str:
    """A process that, on SIGTERM, takes ``seconds`` to 'write its checkpoint', then exits 143."""
    return (
        "import json, signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *_: (time.sleep({seconds}), sys.exit(143)))\n"
        "print(json.dumps({'event': 'progress', 'stage': 'teacher_a', 'step': 1, 'total': 2}), flush=True)\n"
        "time.sleep(60)\n"
    )


def test_a_pending_kill_never_reaches_the_next_run(qgis_iface, tmp_path):
    """Cancel, start again and cancel within the first grace time: the second run gets its own grace."""
    runner = TrainingRunner(task_manager=False, cancel_grace_ms=4000)
    events, outcomes = [], []
    runner.backend_event.connect(events.append)
    runner.finished.connect(outcomes.append)
    runner.start([sys.executable, "-c", fake_checkpoint(0)], [], str(tmp_path / "run"))
    assert wait_until(lambda: bool(events), 60)
    first_cancel = time.monotonic()
    runner.cancel()
    assert wait_until(lambda: len(outcomes) == 1, 30)
    events.clear()
    runner.start([sys.executable, "-c", fake_checkpoint(3)], [], str(tmp_path / "run"))
    assert wait_until(lambda: bool(events), 60)
    wait_until(lambda: time.monotonic() - first_cancel > 2, 5)  # the first kill would land mid-checkpoint
    runner.cancel()
    assert wait_until(lambda: len(outcomes) == 2, 30)
    assert outcomes[1].status == "cancelled" and outcomes[1].exit_code == 143, outcomes[1].details()


def test_a_layer_removed_from_the_project_leaves_its_pair_side_empty(layers, make_dock, tmp_path):
    """The combo of a removed layer never moves on to the next layer in its list (a silently swapped pair)."""
    project = QgsProject.instance()
    mask_b = QgsRasterLayer(write_raster(tmp_path / "mb.tif", x0=500100.0, bands=1), "mask B", "gdal")
    scene_c = QgsRasterLayer(write_raster(tmp_path / "c.tif"), "scene C", "gdal")
    scene_d = QgsRasterLayer(write_raster(tmp_path / "d.tif"), "scene D", "gdal")  # next after scene C
    test_mask = QgsRasterLayer(write_raster(tmp_path / "mc.tif", bands=1), "test mask", "gdal")
    project.addMapLayers([mask_b, scene_c, scene_d, test_mask])
    dock = make_dock(missing_backend(tmp_path))
    dock.labelled.set_pairs([Pair(layers["scene A"], layers["mask A"]), Pair(layers["scene B"], mask_b)])
    dock.test_pairs.set_pairs([Pair(scene_c, test_mask)])
    dock.unlabelled.set_all(False)
    dock.unlabelled.findItems("scene D", Qt.MatchFlag.MatchExactly)[0].setCheckState(Qt.CheckState.Checked)

    project.removeMapLayer(layers["mask A"].id())
    project.removeMapLayer(scene_c.id())
    first, second = dock.labelled.rows
    assert (first.pair().image, first.pair().label) == (layers["scene A"], None)
    assert (second.pair().image, second.pair().label) == (layers["scene B"], mask_b)
    assert "'mask A'" in first.note.text() and first.note.isVisibleTo(dock) and not second.note.isVisibleTo(dock)
    test_row = dock.test_pairs.rows[0]
    assert (test_row.pair().image, test_row.pair().label) == (None, test_mask)
    assert "'scene C'" in test_row.note.text()
    assert [layer.name() for layer in dock.unlabelled.checked_layers()] == ["scene D"]
    problems = dock.check(dock.current_plan())
    assert "Labelled pair 1: choose a label layer." in problems and "Test pair 1: choose an image." in problems
    dock.save_settings()
    assert settings.project_json("labelled", [])[0] == {"image": layers["scene A"].id(), "label": ""}

    first.label.setLayer(mask_b)  # chosen again: the note goes
    assert not first.note.isVisibleTo(dock)


def tab_chain(dock):
    """The dock's controls in the order Tab visits them: its focus chain, shown, enabled and tab-focusable."""
    chain, widget = [], dock.widget()
    for _ in range(2000):
        widget = widget.nextInFocusChain()
        if widget is dock.widget():
            return chain
        if widget.focusPolicy() & Qt.FocusPolicy.TabFocus and widget.isVisibleTo(dock) and widget.isEnabled():
            chain.append(widget)
    raise AssertionError("the focus chain does not come back to the dock's contents")


def test_tab_reaches_pair_rows_where_they_are_shown(layers, make_dock, tmp_path):
    """Rows made after the footer buttons still come before "Add labelled pair", not after Start."""
    dock = make_dock(missing_backend(tmp_path))
    dock.labelled.set_pairs([Pair(layers["scene A"], layers["mask A"])])
    dock.labelled.add_button.click()
    dock.test_box.setCollapsed(False)
    dock.test_pairs.add_button.click()
    first, second = dock.labelled.rows
    test_row = dock.test_pairs.rows[0]
    names = {
        first.image: "image 1", first.label: "labels 1", first.remove: "remove 1",
        second.image: "image 2", second.label: "labels 2", second.remove: "remove 2",
        dock.labelled.add_button: "add pair", dock.unlabelled: "unlabelled", dock.all_button: "all",
        dock.none_button: "none", test_row.image: "test image", test_row.label: "test labels",
        test_row.remove: "test remove", dock.test_pairs.add_button: "add test pair", dock.start_button: "start",
    }
    visited = [names[widget] for widget in tab_chain(dock) if widget in names]
    assert visited == list(names.values())


def test_long_status_wraps_instead_of_widening_the_dock(make_dock, tmp_path):
    """A wider minimum would push the map aside in QGIS."""
    dock = make_dock(missing_backend(tmp_path))
    dock.resize(420, 720)
    dock.show()
    dock.tabs.setCurrentIndex(dock.tabs.indexOf(dock.log.parentWidget()))
    narrowest = dock.widget().minimumSizeHint().width()
    dock.stage_strip.reset(list(TRAIN_STAGES))  # baselines on: 8 chips
    dock.on_event({"event": "progress", "stage": "teachers_ssl", "step": 12345, "total": 20000, "eta": 7384})
    QgsApplication.processEvents()  # the layout takes the label's new size
    assert dock.status_label.text() == "Cross-model SSL · step 12345 of 20000"
    assert dock.widget().minimumSizeHint().width() <= narrowest < 420
    dock.log_line("Wrote checkpoint: " + "/very/long/folder/name" * 20 + "/teachers_ssl.pt", "info")
    QgsApplication.processEvents()
    assert dock.log.horizontalScrollBar().maximum() == 0  # wrapped, even inside the path
    dock.hide()


def test_non_obvious_controls_explain_themselves(make_dock, tmp_path):
    dock = make_dock(missing_backend(tmp_path))
    controls = {
        "All": dock.all_button, "None": dock.none_button, "Device": dock.device, "Seed": dock.seed,
        "Config file": dock.config_file, "Bands": dock.bands, "Extra options": dock.extra_args,
        "Output folder": dock.output_folder, "Run name": dock.run_name, "Cancel": dock.cancel_button,
    }
    assert [name for name, widget in controls.items() if not widget.toolTip()] == []
    assert "bands" in dock.all_button.toolTip()
    assert dock.width_label.buddy() is dock.label_width


def test_unloading_leaves_another_projects_run_state_alone(make_dock, tmp_path):
    """Unloading during a run started in another project stops it and writes nothing into the open one."""
    project = QgsProject.instance()
    backend = fake_backend(tmp_path)
    for own_project, expected in ((False, "done"), (True, "cancelled")):
        project.clear()
        dock = make_dock(missing_backend(tmp_path))
        dock.backend = backend
        run = tmp_path / f"run-{own_project}"
        dock._start_process([str(run), str(tmp_path / "never")], str(run), fresh=True)
        assert wait_until(lambda d=dock: d.stage_strip.current == "teacher_a", 60)  # the backend runs
        if not own_project:
            project.clear()  # another project opened while the run goes on
        settings.set_project_value("last_run_state", "done")
        dock.shutdown()
        assert not dock.runner.is_running()
        assert settings.project_value("last_run_state") == expected


def test_the_use_button_follows_the_model_chosen_elsewhere(make_dock, tmp_path):
    run = finished_run(tmp_path / "run-1")
    dock = make_dock(missing_backend(tmp_path))
    dock.run_dir = str(run)
    dock.load_results(str(run))
    assert dock.use_button.text() == "Use this model"
    dock.use_button.click()
    assert dock.use_button.text() == "In use for segmentation"
    settings.set_selected_model(str(tmp_path / "deepness.onnx"))  # what Plugins > Choose Road Model… does
    assert dock.use_button.text() == "Use this model"
    settings.set_selected_model(str(run / "student.onnx"))
    assert dock.use_button.text() == "In use for segmentation"
