"""scripts/gpu_check.py without a GPU: the packed dataset comes back pixel for pixel, and the fitted length."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from conftest import SCRIPTS, load_script, road_mask, write_raster
from road_sslkd.data import DatasetSpec


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("gpu_check")


@pytest.fixture
def png_dataset(tmp_path) -> Path:
    """SYNTHETIC: two RGB PNG pairs (noise over a road); unlabelled an RGB PNG, a GeoTIFF and a PNG wider than
    WebP allows."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        image = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
        image[:, road_mask() == 1] //= 4
        write_raster(data / "images" / f"{name}.png", image, driver="PNG")
    write_raster(data / "images" / "d.tif", rng.integers(0, 256, (3, 64, 64), dtype=np.uint8))
    write_raster(data / "images" / "e.png", rng.integers(0, 256, (1, 2, 16400), dtype=np.uint8), driver="PNG")
    for name in ("a", "b"):
        write_raster(data / "masks" / f"{name}.png", road_mask() * 255, driver="PNG")
    split = {"labelled": [{"image": "images/a.png", "mask": "masks/a.png"}],
             "test": [{"image": "images/b.png", "mask": "masks/b.png"}],
             "unlabelled": ["images/c.png", "images/d.tif", "images/e.png"]}
    (data / "split.json").write_text(json.dumps(split))
    return data


def _pixels(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def test_pack_and_unpack_give_back_every_pixel(gpu_check, png_dataset, tmp_path):
    tar_path = tmp_path / "dataset.tar"
    gpu_check.pack_dataset(png_dataset, tar_path)
    with tarfile.open(tar_path) as tar:
        names = set(tar.getnames())
    assert {"images/a.png.webp", "images/b.png.webp", "images/c.png.webp", "images/d.tif", "images/e.png"} <= names
    assert {"masks/a.png", "masks/b.png", "split.json"} <= names and "images/a.png" not in names

    back = gpu_check.unpack_dataset(tar_path, tmp_path / "back")
    for rel in ("images/a.png", "images/b.png", "images/c.png", "images/d.tif", "images/e.png", "masks/a.png",
                "masks/b.png"):
        assert np.array_equal(_pixels(back / rel), _pixels(png_dataset / rel)), rel
    assert not list(back.rglob("*.webp"))
    spec = DatasetSpec.from_split(back)
    assert (len(spec.labelled), len(spec.unlabelled), len(spec.test)) == (1, 3, 1)


def test_a_split_path_outside_the_dataset_is_refused(gpu_check, png_dataset):
    split = json.loads((png_dataset / "split.json").read_text())
    split["unlabelled"].append("../elsewhere.png")
    (png_dataset / "split.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match="not inside the dataset folder"):
        gpu_check.split_files(png_dataset)


def test_fit_scale_keeps_the_seeds_within_the_budget(gpu_check):
    # A 60 s pilot that trained 10 s at scale 0.005; 3 seeds, each the pilot plus its training scaled.
    scale = gpu_check.fit_scale(60, 10, 0.005, 500, 3)
    assert scale == pytest.approx(0.058)  # ratio 1 + (500 / 3 - 60) / 10: 0.0583, rounded down to two digits
    assert 3 * (60 + 10 * (scale / 0.005 - 1)) <= 500
    assert gpu_check.fit_scale(60, 10, 0.005, 500 * 4, 3) > scale
    assert gpu_check.fit_scale(60, 10, 0.5, 10_000, 3) == 1.0  # never past the preset's own length
    assert gpu_check.fit_scale(60, 10, 0.005, 3 * 65, 3) is None  # not twice the pilot


def test_setup_records_the_machine_and_trains_every_stage_on_it(tmp_path):
    # Here every wheel is installed already: setup installs nothing, as on a second call there.
    script, work = SCRIPTS / "gpu_check.py", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(script), "setup", "--device", "cpu", "--work", str(work)],
                          env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    machine = json.loads((tmp_path / "machine.json").read_text())
    assert machine["torch"] == torch.__version__ and machine["rasterio"] == rasterio.__version__
    assert machine["gpu"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    run = work / "smoke" / "run"
    assert machine["smoke_s"] > 0 and (run / "student.onnx").is_file()
    assert set(json.loads((run / "metrics.json").read_text())["models"]) >= {"teacher_a_ssl", "student_sslkd"}
