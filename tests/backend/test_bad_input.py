"""Bad input: an `error` event naming the file and the fix, exit code 2, nothing written, nothing lost."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from rasterio.transform import Affine

from conftest import GRID, errors, road_mask, write_raster
from road_sslkd.config import make_config
from road_sslkd.data import DatasetSpec
from road_sslkd.events import UserError
from road_sslkd.runs import RunDir


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
    assert "current folder" in error["hint"] and "split.json" not in error["hint"]


def test_missing_file_of_a_split(run_main, tmp_path, tiny_dataset):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (data / "images" / "scene_001.tif").unlink()
    error = _fails(run_main, tmp_path, "--data", str(data), needle="scene_001.tif")
    assert "split.json" in error["hint"] and str(data) in error["hint"]


def test_size_mismatch(run_main, tmp_path):
    image = write_raster(tmp_path / "img.tif", np.zeros((3, 64, 64), np.uint8))
    mask = write_raster(tmp_path / "mask.tif", np.full((32, 32), 255, np.uint8))
    _fails(run_main, tmp_path, "--labelled", f"{image}:{mask}", needle="mask.tif")


def test_crs_mismatch(run_main, tmp_path):
    image = write_raster(tmp_path / "img.tif", np.zeros((3, 64, 64), np.uint8))
    mask = write_raster(tmp_path / "mask.tif", np.full((64, 64), 255, np.uint8), crs="EPSG:3857")
    error = _fails(run_main, tmp_path, "--labelled", f"{image}:{mask}", needle="EPSG:3857")
    assert "reproject" in error["hint"]


@pytest.mark.parametrize("shift_px", [2, 40])
def test_mask_on_another_footprint(run_main, tmp_path, shift_px):
    image = write_raster(tmp_path / "img.tif", np.zeros((3, 64, 64), np.uint8))
    mask = write_raster(tmp_path / "mask.tif", road_mask(), transform=GRID * Affine.translation(shift_px, 0))
    error = _fails(run_main, tmp_path, "--labelled", f"{image}:{mask}", needle="footprint")
    assert f"{shift_px:.1f} px" in error["message"] and "gdalwarp" in error["hint"]


def test_mask_without_georeferencing(run_main, tmp_path):
    image = write_raster(tmp_path / "img.tif", np.zeros((3, 64, 64), np.uint8))
    mask = write_raster(tmp_path / "mask.tif", road_mask(), crs=None, transform=Affine.identity())
    error = _fails(run_main, tmp_path, "--labelled", f"{image}:{mask}", needle="has no georeferencing")
    assert error["message"].startswith(f"mask {mask}") and "-a_srs" in error["hint"]


def test_mask_without_crs(run_main, tmp_path):
    image = write_raster(tmp_path / "img.tif", np.zeros((3, 64, 64), np.uint8))
    mask = write_raster(tmp_path / "mask.tif", road_mask(), crs=None)
    error = _fails(run_main, tmp_path, "--labelled", f"{image}:{mask}", needle="no CRS")
    assert "gdal_edit.py -a_srs EPSG:32633" in error["hint"]


def test_multiband_mask(run_main, tmp_path):
    image = write_raster(tmp_path / "img.tif", np.zeros((3, 64, 64), np.uint8))
    mask = write_raster(tmp_path / "mask.tif", np.stack([road_mask(), 1 - road_mask()]))
    error = _fails(run_main, tmp_path, "--labelled", f"{image}:{mask}", needle="2 bands")
    assert "-b 1" in error["hint"]


def test_mask_whose_nodata_hides_the_background(run_main, tmp_path):
    """A 0/1 mask written with nodata=0 (as rasterising tools do) has no background left."""
    image = write_raster(tmp_path / "img.tif", np.full((3, 64, 64), 90, np.uint8))
    mask = write_raster(tmp_path / "mask.tif", road_mask(), nodata=0)
    error = _fails(run_main, tmp_path, "--labelled", f"{image}:{mask}", needle="no background")
    assert f"gdal_edit.py -unsetnodata {mask}" in error["hint"]


def test_mask_that_is_all_road(run_main, tmp_path):
    image = write_raster(tmp_path / "img.tif", np.full((3, 64, 64), 90, np.uint8))
    mask = write_raster(tmp_path / "mask.tif", np.full((64, 64), 255, np.uint8))
    error = _fails(run_main, tmp_path, "--labelled", f"{image}:{mask}", needle="no background")
    assert "-unsetnodata" not in error["hint"]


def test_mask_withoutroad_mask(run_main, tmp_path):
    image = write_raster(tmp_path / "img.tif", np.full((3, 64, 64), 90, np.uint8))
    mask = write_raster(tmp_path / "mask.tif", np.zeros((64, 64), np.uint8))
    _fails(run_main, tmp_path, "--labelled", f"{image}:{mask}", needle="no road pixel")


def test_all_nodata_raster(run_main, tmp_path):
    image = write_raster(tmp_path / "img.tif", np.zeros((3, 64, 64), np.uint8), nodata=0)
    mask = write_raster(tmp_path / "mask.tif", np.full((64, 64), 255, np.uint8))
    _fails(run_main, tmp_path, "--labelled", f"{image}:{mask}", needle="all nodata")


def test_diverging_training_stops(run_main, tmp_path, tiny_dataset):
    cfg = tmp_path / "settings.json"
    cfg.write_text(json.dumps({"lr": 1e30}))
    out = tmp_path / "run"
    code, events = run_main("train", "--preset", "tiny", "--out", str(out), "--data", str(tiny_dataset),
                            "--config", str(cfg), "--stages", "teacher_a")
    assert code == 2
    (error,) = errors(events)
    assert "diverged" in error["message"] and "teacher_a" in error["message"] and "lr" in error["hint"]
    assert not any(e["event"] == "metric" and e["value"] is None for e in events)
    assert not (out / "models" / "teacher_a.pt").exists()


def test_too_few_bands(run_main, tmp_path, tiny_dataset):
    image = tiny_dataset / "images" / "scene_000.tif"
    mask = tiny_dataset / "masks" / "scene_000.tif"
    error = _fails(run_main, tmp_path, "--labelled", f"{image}:{mask}", "--bands", "1,2,4", needle="3 band")
    assert "--bands" in error["hint"]


def test_bands_that_are_not_numbers(run_main, tmp_path, tiny_dataset):
    error = _fails(run_main, tmp_path, "--data", str(tiny_dataset), "--bands", "1,2,x", needle="--bands 1,2,x")
    assert "--bands 1,2,3" in error["hint"]


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


@pytest.mark.parametrize("setting, value, needle", [
    ("crop", "64", "crop"), ("steps", 5, "steps"), ("bands", "1,2,3", "bands"), ("lr", "0.001", "lr"),
    ("amp", 1, "amp"), ("steps", {"teachr": 5}, "teachr"), ("stages", ["teacher_x"], "teacher_x"),
])
def test_config_value_of_the_wrong_type(run_main, tmp_path, tiny_dataset, setting, value, needle):
    cfg = tmp_path / "settings.json"
    cfg.write_text(json.dumps({setting: value}))
    _fails(run_main, tmp_path, "--data", str(tiny_dataset), "--config", str(cfg), needle=needle)


def test_unknown_stage_leaves_no_run_folder(run_main, tmp_path, tiny_dataset):
    error = _fails(run_main, tmp_path, "--data", str(tiny_dataset), "--stages", "teacher_a,teacher_x",
                   needle="teacher_x")
    assert "student_sslkd" in error["hint"]


@pytest.fixture
def new_run(tmp_path, tiny_dataset):
    """A run folder as `train --out` writes it before its first stage (no model trained yet)."""
    return RunDir.create(tmp_path / "run", make_config("tiny"), DatasetSpec.from_split(tiny_dataset)).path


@pytest.mark.parametrize("flags", [["--preset", "cpu"], ["--steps-scale", "2"], ["--seed", "0"],
                                   ["--out", "elsewhere"], ["--data", "DATA"], ["--labelled", "a.tif:b.tif"],
                                   ["--config", "settings.json"]])
def test_resume_refuses_data_and_settings_flags(run_main, new_run, tiny_dataset, flags):
    stored = (new_run / "config.json").read_text()
    flags = [str(tiny_dataset) if f == "DATA" else f for f in flags]
    code, events = run_main("train", "--resume", str(new_run), *flags)
    assert code == 2
    (error,) = errors(events)
    assert flags[0] in error["message"] and "config.json" in error["message"]
    assert "--stages and --device" in error["hint"]
    assert (new_run / "config.json").read_text() == stored


def test_resume_checks_stages_before_saving_them(run_main, new_run):
    stored = (new_run / "config.json").read_text()
    code, events = run_main("train", "--resume", str(new_run), "--stages", "teacher_x")
    assert code == 2 and "teacher_x" in errors(events)[0]["message"]
    assert (new_run / "config.json").read_text() == stored
    code, events = run_main("train", "--resume", str(new_run), "--stages", "teacher_a", "--device", "cpu")
    assert code == 0, errors(events)
    assert json.loads((new_run / "config.json").read_text())["config"]["stages"] == ["teacher_a"]


def test_resume_after_an_image_changed_is_refused(run_main, tmp_path, tiny_dataset):
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    run = RunDir.create(tmp_path / "run", make_config("tiny"), DatasetSpec.from_split(data))
    first, second = run.dataset.unlabelled[:2]
    os.utime(first, (0, 0))  # a copy may lose the modification time: that is no change
    RunDir.open(run.path).require_unchanged_images()
    shutil.copyfile(second, first)  # new pixels under the old name: cached teacher maps would be stale
    code, events = run_main("train", "--resume", str(run.path))
    assert code == 2 and f"{first} changed since the run" in errors(events)[0]["message"]


def test_out_that_is_a_file(run_main, tmp_path, tiny_dataset):
    out = tmp_path / "run"
    out.write_text("not a folder")
    code, events = run_main("train", "--preset", "tiny", "--out", str(out), "--data", str(tiny_dataset))
    assert code == 2
    (error,) = errors(events)
    assert f"--out {out}" in error["message"] and "folder" in error["hint"]
    assert out.read_text() == "not a folder"


def test_evaluate_data_without_a_test_split(run_main, new_run, tmp_path, tiny_dataset):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    split = json.loads((data / "split.json").read_text())
    (data / "split.json").write_text(json.dumps({**split, "test": []}))
    code, events = run_main("evaluate", str(new_run), "--data", str(data))
    assert code == 2
    (error,) = errors(events)
    assert "no 'test' entries" in error["message"] and "--test" in error["hint"]


def test_evaluate_data_and_test_together(run_main, new_run, tiny_dataset):
    pair = f"{tiny_dataset / 'images' / 'scene_004.tif'}:{tiny_dataset / 'masks' / 'scene_004.tif'}"
    code, events = run_main("evaluate", str(new_run), "--data", str(tiny_dataset), "--test", pair)
    assert code == 2
    (error,) = errors(events)
    assert "--data and --test" in error["message"]


def test_dataset_folder_without_split(run_main, tmp_path, tiny_dataset):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset / "images", data / "images")
    _fails(run_main, tmp_path, "--data", str(data), needle="split.json")


def test_a_failed_write_leaves_no_partial_file_and_says_why(tmp_path):
    """torch.save reports a full disk as a RuntimeError: the run stops with a user error, the partial file goes."""
    from road_sslkd.runs import _atomic_write

    def full_disk(tmp):
        tmp.write_bytes(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    with pytest.raises(UserError, match=r"cannot write .*teacher_a\.pt \(\d+ MB free there\)"):
        _atomic_write(tmp_path / "teacher_a.pt", full_disk)
    assert list(tmp_path.iterdir()) == []
