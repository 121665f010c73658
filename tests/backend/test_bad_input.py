"""Bad input: an `error` event naming the file and the fix, exit code 2, nothing written, nothing lost."""

import json
import shutil

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from conftest import errors


def _write(path, array, crs="EPSG:32633", nodata=None):
    array = array if array.ndim == 3 else array[None]
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                       dtype=array.dtype, crs=crs, transform=from_origin(500000, 5000000, 0.5, 0.5),
                       nodata=nodata) as dst:
        dst.write(array)
    return path


def _fails(run_main, tmp_path, *args, needle):
    out = tmp_path / "run"
    code, events = run_main("train", "--preset", "tiny", "--out", str(out), *args)
    assert code == 2
    (error,) = errors(events)
    assert needle in error["message"] and error["hint"]
    assert not out.exists(), "a failed start must not leave a run folder"
    return error


def test_missing_file(run_main, tmp_path, tiny_dataset):
    image = tiny_dataset / "images" / "scene_000.tif"
    error = _fails(run_main, tmp_path, "--labelled", f"{image}:{tmp_path / 'nope.tif'}", needle="nope.tif")
    assert "not found" in error["message"]


def test_size_mismatch(run_main, tmp_path):
    image = _write(tmp_path / "img.tif", np.zeros((3, 64, 64), np.uint8))
    mask = _write(tmp_path / "mask.tif", np.full((32, 32), 255, np.uint8))
    _fails(run_main, tmp_path, "--labelled", f"{image}:{mask}", needle="mask.tif")


def test_crs_mismatch(run_main, tmp_path):
    image = _write(tmp_path / "img.tif", np.zeros((3, 64, 64), np.uint8))
    mask = _write(tmp_path / "mask.tif", np.full((64, 64), 255, np.uint8), crs="EPSG:3857")
    error = _fails(run_main, tmp_path, "--labelled", f"{image}:{mask}", needle="EPSG:3857")
    assert "reproject" in error["hint"]


def test_mask_without_roads(run_main, tmp_path):
    image = _write(tmp_path / "img.tif", np.full((3, 64, 64), 90, np.uint8))
    mask = _write(tmp_path / "mask.tif", np.zeros((64, 64), np.uint8))
    _fails(run_main, tmp_path, "--labelled", f"{image}:{mask}", needle="no road pixel")


def test_all_nodata_raster(run_main, tmp_path):
    image = _write(tmp_path / "img.tif", np.zeros((3, 64, 64), np.uint8), nodata=0)
    mask = _write(tmp_path / "mask.tif", np.full((64, 64), 255, np.uint8))
    _fails(run_main, tmp_path, "--labelled", f"{image}:{mask}", needle="all nodata")


def test_too_few_bands(run_main, tmp_path, tiny_dataset):
    image = tiny_dataset / "images" / "scene_000.tif"
    mask = tiny_dataset / "masks" / "scene_000.tif"
    error = _fails(run_main, tmp_path, "--labelled", f"{image}:{mask}", "--bands", "1,2,4", needle="3 band")
    assert "--bands" in error["hint"]


def test_run_folder_of_another_run_is_kept(run_main, tmp_path, tiny_dataset):
    run = tmp_path / "run"
    run.mkdir()
    config = {"config": {"preset": "cpu"}, "note": "an earlier run"}
    (run / "config.json").write_text(json.dumps(config))
    image = tiny_dataset / "images" / "scene_000.tif"
    mask = tiny_dataset / "masks" / "scene_000.tif"
    code, events = run_main("train", "--preset", "tiny", "--out", str(run), "--labelled", f"{image}:{mask}")
    assert code == 2
    (error,) = errors(events)
    assert "already holds a run" in error["message"] and "--resume" in error["hint"]
    assert json.loads((run / "config.json").read_text()) == config
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_unknown_setting_in_config_file(run_main, tmp_path, tiny_dataset):
    cfg = tmp_path / "settings.json"
    cfg.write_text(json.dumps({"crop": 64, "learning_rate": 0.1}))
    error = _fails(run_main, tmp_path, "--data", str(tiny_dataset), "--config", str(cfg), needle="learning_rate")
    assert "valid:" in error["hint"]


@pytest.mark.parametrize("setting, choices", [("sslkd_teachers", "ssl, warmup"),
                                              ("teachers_ssl_targets", "partner, mean")])
def test_unknown_choice_of_teachers(run_main, tmp_path, tiny_dataset, setting, choices):
    cfg = tmp_path / "settings.json"
    cfg.write_text(json.dumps({setting: "supervised"}))
    error = _fails(run_main, tmp_path, "--data", str(tiny_dataset), "--config", str(cfg), needle=setting)
    assert choices in error["hint"]


def test_dataset_folder_without_split(run_main, tmp_path, tiny_dataset):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset / "images", data / "images")
    _fails(run_main, tmp_path, "--data", str(data), needle="split.json")
