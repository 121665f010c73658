"""Fixtures for the plugin tests: real QGIS (pytest-qgis, offscreen), real backend, small generated data."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsSettings, QgsVectorLayer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

BACKEND_CLI = REPO / ".venv-backend" / ("Scripts/road-sslkd.exe" if os.name == "nt" else "bin/road-sslkd")


def wait_until(condition, timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Run the Qt event loop until ``condition()`` is true; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        QgsApplication.processEvents()
        if condition():
            return True
        time.sleep(interval)
    QgsApplication.processEvents()
    return bool(condition())


@pytest.fixture(autouse=True)
def clean_settings():
    """Every test starts without road_sslkd user settings (pytest-qgis keeps a profile in .qgis-settings)."""
    QgsSettings().remove("road_sslkd")
    yield
    QgsSettings().remove("road_sslkd")


@pytest.fixture
def project(qgis_new_project):
    yield qgis_new_project
    qgis_new_project.removeAllMapLayers()


def backend_available() -> bool:
    return BACKEND_CLI.is_file()


needs_backend = pytest.mark.skipif(not backend_available(), reason="run `make setup` first: no .venv-backend")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A tiny synthetic dataset written by the real backend CLI (the plugin cannot import the backend)."""
    if not backend_available():
        pytest.skip("run `make setup` first: no .venv-backend")
    out = tmp_path_factory.mktemp("demo") / "data"
    result = subprocess.run(
        [
            str(BACKEND_CLI),
            "demo-data",
            str(out),
            "--labelled",
            "2",
            "--unlabelled",
            "2",
            "--test",
            "1",
            "--size",
            "128",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def add_demo_layers(project: QgsProject, demo_dir: Path) -> dict:
    """The demo scenes as project layers, by readable name."""
    layers = {}
    for tif in sorted((demo_dir / "images").glob("*.tif")):
        layers[tif.stem] = QgsRasterLayer(str(tif), tif.stem, "gdal")
    for tif in sorted((demo_dir / "masks").glob("*.tif")):
        layers[f"{tif.stem} mask"] = QgsRasterLayer(str(tif), f"{tif.stem} mask", "gdal")
    for gpkg in sorted((demo_dir / "roads").glob("*.gpkg")):
        layers[f"{gpkg.stem} roads"] = QgsVectorLayer(f"{gpkg}|layername=roads", f"{gpkg.stem} roads", "ogr")
    for name, layer in layers.items():
        assert layer.isValid(), name
    project.addMapLayers(list(layers.values()))
    return layers


@pytest.fixture
def own_pip(monkeypatch):
    """pip sees no configuration of this machine (local wheel folders, timeouts) and retries once.

    One retry, not none: pip names a connection error only in its "Retrying" warnings.
    """
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_RETRIES", "1")
