"""metadata.txt is what QGIS's plugin manager reads: complete, in step with the backend's version, and true
about QGIS 4 (Qt6), which it declares."""

import ast
import configparser
import re

import pytest

from conftest import REPO
from road_sslkd_plugin.core.backend import plugin_version


def read_metadata():
    parser = configparser.ConfigParser()
    parser.read(REPO / "metadata.txt", encoding="utf-8")
    return parser["general"]


def test_metadata_has_what_qgis_needs():
    meta = read_metadata()
    required = ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email", "repository",
                "tracker", "homepage", "tags", "category", "icon", "changelog")  # plugins.qgis.org's uploader
    for key in required:
        assert meta.get(key), key
    assert meta["name"] == "Road SSLKD"
    assert meta["qgisMinimumVersion"] == "3.22"
    assert meta["hasProcessingProvider"] == "yes"
    assert (REPO / "resources" / meta["icon"].split("/", 1)[1]).is_file()


def test_plugin_and_backend_versions_are_equal():
    backend = (REPO / "backend" / "src" / "road_sslkd" / "__init__.py").read_text(encoding="utf-8")
    backend_version = re.search(r'^__version__ = "([^"]+)"', backend, re.MULTILINE).group(1)
    assert read_metadata()["version"] == backend_version, "bump metadata.txt and road_sslkd.__version__ together"
    assert plugin_version() == backend_version  # what the dock compares with the installed backend


# Qt5 names that Qt6 removed or moved to QtGui; qgis.PyQt does not map them.
QT6_MOVED = {"QAction", "QActionGroup", "QShortcut", "QFileSystemModel", "QUndoCommand"}


def _qt6_problems(path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    annotations = {id(n) for node in ast.walk(tree)
                   for a in ([node.annotation] if isinstance(node, (ast.arg, ast.AnnAssign)) else
                             [node.returns] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else [])
                   if a is not None for n in ast.walk(a)}
    scoped = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    fallbacks = {id(n) for node in ast.walk(tree) if isinstance(node, ast.ExceptHandler) for n in ast.walk(node)}
    problems = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module == "qgis.PyQt.QtWidgets" and id(node) not in fallbacks:
            problems += [f"{where}: {a.name} from QtWidgets" for a in node.names if a.name in QT6_MOVED]
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("PyQt5", "PyQt6")):
            problems.append(f"{where}: import {node.module} (use qgis.PyQt)")
        if isinstance(node, ast.Attribute) and node.attr == "exec_":
            problems.append(f"{where}: exec_() (use exec())")
        # Qt.AlignLeft is gone in PyQt6: enum values need their enum, Qt.AlignmentFlag.AlignLeft
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr[:1].isupper()
                and node.value.id.startswith("Q") and not node.value.id.startswith(("Qgs", "Qgis"))
                and id(node) not in scoped and id(node) not in annotations):
            problems.append(f"{where}: {node.value.id}.{node.attr} (use the enum's full scope)")
    return problems


def test_plugin_sources_keep_to_what_qt6_accepts():
    assert "4." in read_metadata()["qgisMaximumVersion"]
    sources = sorted((REPO / "road_sslkd_plugin").rglob("*.py"))
    assert len(sources) > 10
    problems = [p for path in sources for p in _qt6_problems(path)]
    assert not problems, "\n".join(problems)


def test_moved_qgis_names_resolve_on_this_qgis():
    from qgis.core import Qgis, QgsProcessing, QgsRasterInterface, QgsTask, QgsUnitTypes

    from road_sslkd_plugin import compat

    # On 3.22 every newer spelling is missing, so each value must come from its older path
    assert compat.DISTANCE_METERS == QgsUnitTypes.DistanceMeters
    assert compat.DISTANCE_UNKNOWN == QgsUnitTypes.DistanceUnknownUnit
    assert compat.TASK_CAN_CANCEL == QgsTask.CanCancel
    assert compat.SOURCE_RASTER == QgsProcessing.TypeRaster
    assert compat.RASTER_SIZE == QgsRasterInterface.Size
    assert compat.qgis_enum("Qgis.MessageLevel.Warning", "Qgis.NoSuchEnum.X") == Qgis.Warning  # newer first
    assert compat.qgis_enum("Qgis.NoSuchEnum.X", "Qgis.MessageLevel.Warning") == Qgis.Warning
    with pytest.raises(AttributeError, match="neither Qgis.NoSuchEnum.X nor Qgis.NoSuchEnum.Y"):
        compat.qgis_enum("Qgis.NoSuchEnum.X", "Qgis.NoSuchEnum.Y")
