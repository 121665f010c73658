"""The plugin loads in QGIS, adds its button, menu entry, dock and provider, and unload removes them all."""

import os
import shutil
import subprocess
import sys
import textwrap

import qgis.utils
from qgis.core import QgsApplication
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QCoreApplication, QEvent

import road_sslkd_plugin
from conftest import REPO
from road_sslkd_plugin.plugin import RoadSSLKDPlugin


def _flush_deletes():
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    QgsApplication.processEvents()


def test_load_show_and_unload(qgis_iface, project):
    qgis_iface.mainWindow().show()  # the dock's visibility follows its (main) window's
    plugin = road_sslkd_plugin.classFactory(qgis_iface)
    assert isinstance(plugin, RoadSSLKDPlugin)
    plugin.initGui()
    registry = QgsApplication.processingRegistry()
    assert registry.providerById("road_sslkd") is not None
    action = plugin.action
    assert action is not None and not action.icon().isNull()
    settings_actions = [plugin.keep_action, plugin.lines_action]  # the menu's checkable user settings, off at first
    assert all(a.isCheckable() and not a.isChecked() for a in settings_actions)

    action.trigger()  # the toolbar button opens the dock...
    dock = plugin.dock
    assert dock is not None and dock.isUserVisible()
    action.trigger()  # ...and closes it again
    assert not dock.isUserVisible()
    action.trigger()
    assert dock.isUserVisible() and action.isChecked()

    plugin.unload()
    _flush_deletes()
    qgis_iface.mainWindow().hide()
    assert plugin.dock is None and plugin.action is None and plugin.provider is None
    assert sip.isdeleted(action) and sip.isdeleted(dock) and all(sip.isdeleted(a) for a in settings_actions)
    assert registry.providerById("road_sslkd") is None
    assert "torch" not in sys.modules, "the plugin must never import torch"
    # The ONNX engine (road_sslkd.engine/onnx_runtime) may be loaded in-process; the training side never.
    for module in ("rasterio", "road_sslkd.pipeline", "road_sslkd.trainer"):
        assert module not in sys.modules, f"the plugin must never import {module}"


def test_unload_without_ever_opening_the_dock(qgis_iface):
    plugin = road_sslkd_plugin.classFactory(qgis_iface)
    plugin.initGui()
    plugin.unload()
    assert QgsApplication.processingRegistry().providerById("road_sslkd") is None


def test_loads_through_qgis_plugin_machinery_from_a_zip_layout(qgis_iface, tmp_path):
    """Like `make zip` + "Install from ZIP": metadata.txt and resources/ inside the plugin folder."""
    name = "road_sslkd_plugin_zipped"
    target = tmp_path / name
    shutil.copytree(REPO / "road_sslkd_plugin", target, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "metadata.txt", target / "metadata.txt")
    shutil.copytree(REPO / "resources", target / "resources")
    qgis.utils.plugin_paths.insert(0, str(tmp_path))
    sys.path.insert(0, str(tmp_path))
    try:
        qgis.utils.updateAvailablePlugins()
        assert name in qgis.utils.available_plugins
        assert qgis.utils.pluginMetadata(name, "name") == "Road SSLKD"
        assert qgis.utils.pluginMetadata(name, "hasProcessingProvider") == "yes"
        assert qgis.utils.loadPlugin(name)
        assert qgis.utils.startPlugin(name)
        plugin = qgis.utils.plugins[name]
        assert not plugin.action.icon().isNull()  # resources/ found inside the plugin folder
        plugin.show_dock(True)
        # In a zip install there is no .venv-backend next to the plugin: the dock says so.
        assert plugin.dock.locator.plugin_dir == target
        assert qgis.utils.unloadPlugin(name)
        assert name not in qgis.utils.active_plugins
        assert QgsApplication.processingRegistry().providerById("road_sslkd") is None
    finally:
        qgis.utils.plugin_paths.remove(str(tmp_path))
        sys.path.remove(str(tmp_path))
        _flush_deletes()


def test_qgis_starts_with_the_plugin_when_numpy_onnxruntime_and_backend_are_missing(tmp_path):
    """A fresh QGIS process where those imports fail: the plugin still loads and shows its dock."""
    script = tmp_path / "start.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        BLOCKED = ("numpy", "onnxruntime", "torch", "road_sslkd")

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked for the test: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        sys.path.insert(0, {str(REPO)!r})
        from qgis.core import QgsApplication
        app = QgsApplication([], True)
        app.initQgis()
        from qgis.PyQt.QtWidgets import QMainWindow
        import road_sslkd_plugin

        class Iface:  # the few QgisInterface calls the plugin makes
            def __init__(self):
                self.window = QMainWindow()
            def mainWindow(self):
                return self.window
            def addToolBarIcon(self, action): pass
            def removeToolBarIcon(self, action): pass
            def addPluginToMenu(self, menu, action): pass
            def removePluginMenu(self, menu, action): pass
            def addDockWidget(self, area, dock): self.window.addDockWidget(area, dock)
            def removeDockWidget(self, dock): self.window.removeDockWidget(dock)
            def mapCanvas(self): return None

        plugin = road_sslkd_plugin.classFactory(Iface())
        plugin.initGui()
        plugin.show_dock(True)
        print("DOCK", plugin.dock.objectName(), plugin.dock.setup_button.isVisibleTo(plugin.dock))
        plugin.unload()
        print("BLOCKED", [m for m in sys.modules if m.split(".")[0] in BLOCKED])
        app.exitQgis()
    """)
    )
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", HOME=str(tmp_path))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DOCK RoadSSLKDDock" in result.stdout
    assert "BLOCKED []" in result.stdout


def test_unload_stops_a_running_training(qgis_iface, project, tmp_path):
    """A backend-like process that checkpoints on SIGTERM: unload stops it and leaves no task behind."""
    from conftest import wait_until
    from road_sslkd_plugin.core import settings

    plugin = road_sslkd_plugin.classFactory(qgis_iface)
    plugin.initGui()
    plugin.show_dock(True)
    marker = tmp_path / "checkpoint"
    code = textwrap.dedent(f"""
        import json, signal, sys, time
        def stop(*_):
            open({str(marker)!r}, "w").write("saved")
            sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
        print(json.dumps({{"event": "progress", "stage": "teacher_a", "step": 1, "total": 100}}), flush=True)
        time.sleep(60)
    """)
    dock = plugin.dock
    dock.runner.start([sys.executable, "-c", code], [], str(tmp_path / "run"))
    dock._set_running(True)
    process = dock.runner.process
    assert wait_until(lambda: dock.stage_strip.current == "teacher_a", 30)
    assert QgsApplication.taskManager().countActiveTasks() == 1  # progress shown in QGIS's task bar too
    plugin.unload()
    assert process.state() == process.ProcessState.NotRunning
    assert marker.read_text() == "saved"  # it got SIGTERM, not SIGKILL
    assert settings.project_value("last_run_state") == "cancelled"
    assert wait_until(lambda: QgsApplication.taskManager().countActiveTasks() == 0, 10)
    _flush_deletes()
