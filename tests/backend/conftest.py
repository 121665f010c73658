"""Shared fixtures: a small synthetic dataset (generated, never real data) and the CLI as a subprocess."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from road_sslkd.demo_data import write_demo_dataset

CLI = [sys.executable, "-m", "road_sslkd.cli"]
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str):
    """scripts/NAME.py as a module: the scripts are not a package."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """SYNTHETIC scenes: 2 labelled, 2 unlabelled, 1 test, 96 px."""
    folder = tmp_path_factory.mktemp("synthetic")
    write_demo_dataset(folder, labelled=2, unlabelled=2, test=1, size=96, seed=3)
    return folder


def run_cli(*args: str, timeout: float = 300) -> tuple[int, list[dict], str]:
    """Run `road-sslkd ARGS`; every stdout line must be a JSON event. Returns (code, events, stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert all("event" in e for e in events)
    return proc.returncode, events, proc.stderr


@pytest.fixture
def run_main(capsys):
    """`road-sslkd ARGS` in this process (fast; the same code path as the console script)."""
    from road_sslkd import cli

    def run(*args: str) -> tuple[int, list[dict]]:
        capsys.readouterr()
        code = cli.main(list(args))
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert all("event" in e for e in events)
        return code, events

    return run


def errors(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "error"]


GRID = from_origin(500000, 5000000, 0.5, 0.5)  # 0.5 m pixels in UTM 33N


def write_raster(path, array, driver="GTiff", nodata=None, crs="EPSG:32633", transform=GRID):
    """A (C, H, W) or (H, W) array as a raster; georeferenced unless the driver is a plain image format."""
    array = array if array.ndim == 3 else array[None]
    georef = dict(crs=crs, transform=transform) if driver == "GTiff" else {}
    with rasterio.open(path, "w", driver=driver, width=array.shape[2], height=array.shape[1], count=array.shape[0],
                       dtype=array.dtype, nodata=nodata, **georef) as dst:
        dst.write(array)
    return path


def road_mask(size=64):
    """A 0/1 mask with a horizontal road (background and road both present)."""
    mask = np.zeros((size, size), np.uint8)
    mask[size // 2 - 3 : size // 2 + 3] = 1
    return mask
