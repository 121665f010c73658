"""`make zip` gives a clean package, and that package installs into a fresh QGIS profile and runs there.

The install and the load happen in a separate QGIS process started with a temporary profile folder, so
nothing of the repository (its road_sslkd_plugin, resources/, backend/ or .venv-backend) can stand in for
what the zip holds: the script asserts that the plugin and the ONNX engine are imported from the profile.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = "road_sslkd_plugin"
# What plugins.qgis.org's uploader requires in metadata.txt, plus what this plugin relies on.
REQUIRED_METADATA = (
    "name", "qgisMinimumVersion", "description", "about", "version", "author", "email", "repository",
    "tracker", "homepage", "tags", "category", "icon", "hasProcessingProvider", "changelog",
)

# Runs in a fresh interpreter: a headless QGIS on the temporary profile, with pytest-qgis's QgisInterface
# (toolbar and menu calls made real on Qt widgets, so they can be checked), then QGIS's own plugin machinery.
INSTALL_AND_LOAD = textwrap.dedent("""
    import importlib.util, json, os, sys, zipfile
    from pathlib import Path

    zip_path, profile = sys.argv[1], sys.argv[2]
    # Before the application exists, as pytest-qgis does: its slot signatures do not resolve otherwise.
    from pytest_qgis.mock_qgis_classes import MockMessageBar
    from pytest_qgis.qgis_interface import QgisInterface
    from qgis.core import QgsApplication
    app = QgsApplication([], True, profile)  # profileFolder: settings and plugins live under it
    app.initQgis()
    from qgis.gui import QgsMapCanvas
    from qgis.PyQt.QtWidgets import QDockWidget, QMainWindow, QToolBar
    import qgis.utils

    class Iface(QgisInterface):
        # pytest-qgis's stubs drop toolbar and menu entries; QGIS puts them in its Plugins toolbar and menu.
        def __init__(self, canvas, bar, window):
            super().__init__(canvas, bar, window)
            self.toolbar = QToolBar("Plugins", window)
            window.addToolBar(self.toolbar)
            self.plugins_menu = window.menuBar().addMenu("&Plugins")
        def _submenu(self, name):
            for action in self.plugins_menu.actions():
                if action.menu() is not None and action.text() == name:
                    return action.menu()
            return None
        def addToolBarIcon(self, action): self.toolbar.addAction(action)
        def removeToolBarIcon(self, action): self.toolbar.removeAction(action)
        def addPluginToMenu(self, name, action):
            (self._submenu(name) or self.plugins_menu.addMenu(name)).addAction(action)
        def removePluginMenu(self, name, action):
            menu = self._submenu(name)
            if menu is not None:
                menu.removeAction(action)
                if not menu.actions():
                    self.plugins_menu.removeAction(menu.menuAction())
        def addDockWidget(self, area, dock): self.mainWindow().addDockWidget(area, dock)
        def removeDockWidget(self, dock): self.mainWindow().removeDockWidget(dock)

    window = QMainWindow()
    iface = Iface(QgsMapCanvas(window), MockMessageBar(), window)
    qgis.utils.iface = iface
    window.show()  # offscreen; the dock's visibility follows its window's

    # "Install from ZIP" as QGIS does it: plugin name from metadata.txt's folder, QGIS's unzip, home plugin path.
    plugins_dir = os.path.join(QgsApplication.qgisSettingsDirPath(), "python", "plugins")
    with zipfile.ZipFile(zip_path) as archive:
        name = os.path.split(sorted(f for f in archive.namelist() if f.endswith("metadata.txt"))[0])[0]
    installer = Path(QgsApplication.pkgDataPath()) / "python" / "pyplugin_installer" / "unzip.py"
    spec = importlib.util.spec_from_file_location("qgis_unzip", installer)
    unzip = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(unzip)
    unzip.unzip(zip_path, plugins_dir)
    qgis.utils.plugin_paths[:] = [plugins_dir]
    sys.path.insert(0, plugins_dir)  # what QGIS does for its home plugin path at start-up

    report = {"name": name, "plugins_dir": plugins_dir}
    qgis.utils.updateAvailablePlugins()
    report["available"] = name in qgis.utils.available_plugins
    report["metadata_name"] = qgis.utils.pluginMetadata(name, "name")
    report["loaded"] = qgis.utils.loadPlugin(name)
    report["started"] = qgis.utils.startPlugin(name)
    report["module_file"] = sys.modules[name].__file__
    plugin = qgis.utils.plugins[name]
    registry = QgsApplication.processingRegistry()
    provider = registry.providerById("road_sslkd")
    report["provider"] = provider is not None
    report["algorithms"] = sorted(a.id() for a in provider.algorithms()) if provider else []
    report["toolbar"] = [a.objectName() for a in iface.toolbar.actions()]
    menu = iface._submenu("&Road SSLKD")
    report["menu"] = [a.objectName() for a in menu.actions()] if menu else []
    report["icon"] = not plugin.action.icon().isNull()
    plugin.action.trigger()  # the toolbar button opens the dock
    dock = window.findChild(QDockWidget, "RoadSSLKDDock")
    report["dock"] = dock is not None and dock.isVisible()
    report["dock_plugin_dir"] = str(plugin.dock.locator.plugin_dir)
    from road_sslkd_plugin.core import segment
    report["engine"] = segment.engine_available()  # onnxruntime of this Python + the backend bundled in the zip
    report["engine_file"] = getattr(sys.modules.get("road_sslkd"), "__file__", None)

    report["unloaded"] = qgis.utils.unloadPlugin(name)
    report["provider_after"] = registry.providerById("road_sslkd") is not None
    report["toolbar_after"] = [a.objectName() for a in iface.toolbar.actions()]
    report["menu_after"] = iface._submenu("&Road SSLKD") is not None
    report["module_after"] = name in sys.modules
    report["torch"] = "torch" in sys.modules
    print("REPORT " + json.dumps(report), flush=True)
    app.exitQgis()
""")


@pytest.fixture(scope="module")
def plugin_zip(tmp_path_factory) -> Path:
    """The zip `make zip` builds (same script), written to a temporary folder."""
    target = tmp_path_factory.mktemp("zip") / f"{PACKAGE}.zip"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_zip.py"), str(target)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return target


def leftovers(names: list[str]) -> list[str]:
    """Entries that do not belong in the plugin zip: caches, bytecode, data, hidden files, build output."""
    return [
        name for name in names
        if "__pycache__" in name or name.endswith((".pyc", ".onnx", ".pt", ".tif", ".tmp", ".partial.tif"))
        or "/." in name or ".egg-info" in name or name.split("/")[1] in ("tests", "docs", "demo", "runs", "dist")
    ]


def test_zip_holds_the_plugin_and_nothing_else(plugin_zip):
    with zipfile.ZipFile(plugin_zip) as archive:
        names = archive.namelist()
        meta = configparser.ConfigParser()
        meta.read_string(archive.read(f"{PACKAGE}/metadata.txt").decode("utf-8"))
    assert all(name.startswith(f"{PACKAGE}/") for name in names)
    files = {name[len(PACKAGE) + 1 :] for name in names}
    for needed in (
        "__init__.py", "plugin.py", "provider.py", "metadata.txt", "LICENSE",
        "resources/icon.svg", "resources/segment_extent.svg",
        "resources/road_probability.qml", "resources/road_mask.qml",
        "backend/pyproject.toml", "backend/README.md",
        "backend/src/road_sslkd/onnx_runtime.py", "backend/src/road_sslkd/engine.py",
    ):
        assert needed in files, needed
    assert not leftovers(names), leftovers(names)
    general = meta["general"]
    for key in REQUIRED_METADATA:
        assert general.get(key, "").strip(), f"metadata.txt lacks {key}"
    assert general["hasProcessingProvider"] == "yes"
    assert f"{general['icon']}" in files
    for key in ("repository", "tracker", "homepage"):
        assert general[key].startswith("https://"), key


def test_a_source_tree_without_git_gives_the_same_clean_zip(tmp_path):
    """An unpacked source archive has no git to ask what is tracked: the filters alone keep clutter out."""
    root = tmp_path / "road-sslkd-source"
    for folder in ("road_sslkd_plugin", "resources", "backend"):  # with the checkout's caches and egg-info
        shutil.copytree(REPO / folder, root / folder)
    for name in ("metadata.txt", "LICENSE"):
        shutil.copy(REPO / name, root / name)
    (root / "resources" / ".DS_Store").write_bytes(b"Bud1")
    (root / "backend" / "src" / "road_sslkd.egg-info").mkdir(exist_ok=True)
    (root / "backend" / "src" / "road_sslkd.egg-info" / "PKG-INFO").write_text("Name: road-sslkd\n")
    spec = importlib.util.spec_from_file_location("build_zip", REPO / "scripts" / "build_zip.py")
    build_zip = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_zip)
    with zipfile.ZipFile(build_zip.build(tmp_path / f"{PACKAGE}.zip", root)) as archive:
        names = archive.namelist()
    assert f"{PACKAGE}/backend/src/road_sslkd/engine.py" in names and f"{PACKAGE}/resources/icon.svg" in names
    assert not leftovers(names), leftovers(names)


def test_zip_installs_into_a_fresh_profile_and_loads_there(plugin_zip, tmp_path):
    profile = tmp_path / "profiles" / "default"
    profile.mkdir(parents=True)
    script = tmp_path / "install_and_load.py"
    script.write_text(INSTALL_AND_LOAD, encoding="utf-8")
    # A clean environment: no PYTHONPATH pointing at the checkout, HOME without any QGIS profile.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(QT_QPA_PLATFORM="offscreen", HOME=str(tmp_path))
    result = subprocess.run(
        [sys.executable, str(script), str(plugin_zip), str(profile)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env, check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT ") :])

    installed = (profile / "python" / "plugins" / PACKAGE).resolve()
    assert report["name"] == PACKAGE
    assert Path(report["plugins_dir"]).resolve() == installed.parent
    assert (installed / "metadata.txt").is_file() and (installed / "backend" / "pyproject.toml").is_file()
    assert report["available"] and report["metadata_name"] == "Road SSLKD"
    assert report["loaded"] and report["started"]
    # The installed zip's code ran, not the repository's.
    assert Path(report["module_file"]).resolve().is_relative_to(installed), report["module_file"]
    assert Path(report["dock_plugin_dir"]).resolve() == installed
    assert report["engine"], "the ONNX engine bundled in the zip did not load"
    assert Path(report["engine_file"]).resolve().is_relative_to(installed / "backend" / "src")
    assert report["provider"]
    assert {"road_sslkd:segment_roads", "road_sslkd:centrelines", "road_sslkd:train", "road_sslkd:resume_training",
            "road_sslkd:evaluate"} <= set(report["algorithms"])
    assert report["toolbar"] == ["RoadSSLKDAction", "RoadSSLKDSegmentAction"]
    assert set(report["menu"]) == {
        "RoadSSLKDAction", "RoadSSLKDSegmentAction", "RoadSSLKDChooseModelAction", "RoadSSLKDKeepAction",
        "RoadSSLKDCentrelinesAction",
    }
    assert report["icon"] and report["dock"]
    # Unload leaves nothing behind.
    assert report["unloaded"]
    assert not report["provider_after"], "the Processing provider is still registered after unload"
    assert report["toolbar_after"] == [] and not report["menu_after"] and not report["module_after"]
    assert not report["torch"]
