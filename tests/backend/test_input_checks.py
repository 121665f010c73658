"""Input checks that must let legitimate data through (NaN as nodata, plain PNG pairs, sub-pixel grids, masks
with unknown pixels), and command-line errors on the stdout protocol."""

import json
import math

import numpy as np
import pytest
from rasterio.transform import Affine

from conftest import GRID, errors, road_mask, run_cli, write_raster
from road_sslkd import data
from road_sslkd.data import Label, Normalizer, Pair, Raster


@pytest.mark.parametrize("cached", [True, False])
def test_nan_and_infinite_pixels_are_invalid_and_zeroed(tmp_path, monkeypatch, cached):
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 64, 64)).astype(np.float32)
    pixels[0, :10, :10] = np.nan
    pixels[2, 60:, 60:] = np.inf
    path = write_raster(tmp_path / "img.tif", pixels)
    if not cached:
        monkeypatch.setattr(data, "CACHE_PIXELS", 10)  # windowed reads, as for large rasters
    raster = Raster(path, [1, 2, 3])
    image, valid = raster.read(0, 0, 64, 64)
    assert np.isfinite(image).all()
    assert not valid[:10, :10].any() and not valid[60:, 60:].any() and valid[20:50, 20:50].all()
    assert image[0, 0, 0] == 0.0 and image[1, 0, 0] == pytest.approx(pixels[1, 0, 0] / 255)
    norm = Normalizer.fit([raster])
    assert np.isfinite(norm.mean + norm.std).all()
    assert norm.mean[0] == pytest.approx(pixels[0][valid].mean() / 255, rel=1e-3)


def test_nan_pixels_are_nodata_in_training(run_main, tmp_path):
    """A float raster with NaN and no declared nodata trains on its other pixels, with finite statistics."""
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 64, 64)).astype(np.float32)
    pixels[:, :20, :20] = np.nan
    image = write_raster(tmp_path / "img.tif", pixels)
    mask = write_raster(tmp_path / "mask.tif", road_mask())
    out = tmp_path / "run"
    code, events = run_main("train", "--preset", "tiny", "--out", str(out), "--labelled", f"{image}:{mask}",
                            "--stages", "teacher_a")
    assert code == 0, errors(events)

    def refuse(constant):
        raise ValueError(f"{constant} in config.json")

    stored = json.loads((out / "config.json").read_text(), parse_constant=refuse)
    assert all(math.isfinite(v) for v in stored["normalizer"]["mean"] + stored["normalizer"]["std"])
    losses = [e["value"] for e in events if e["event"] == "metric" and e["name"] == "loss"]
    assert losses and all(v is not None and math.isfinite(v) for v in losses)


def test_nan_in_a_float_mask_is_unknown(tmp_path):
    truth = road_mask().astype(np.float32)
    truth[:, :8] = np.nan
    image = write_raster(tmp_path / "img.tif", np.zeros((3, 64, 64), np.uint8))
    label = Label(Pair(image, write_raster(tmp_path / "mask.tif", truth)), Raster(image, [1, 2, 3]), 1.0)
    mask = label.read(0, 0, 64, 64)
    assert (mask[:, :8] == 255).all() and set(np.unique(mask[:, 8:])) == {0, 1}
    assert label.road_fraction() == pytest.approx(6 / 64)


def test_plain_png_pair_without_georeferencing(tmp_path):
    """Like the CIL 2016 tiles: neither image nor mask has georeferencing; they match in pixel space."""
    image = write_raster(tmp_path / "img.png", np.zeros((3, 64, 64), np.uint8), driver="PNG")
    mask = write_raster(tmp_path / "mask.png", road_mask() * 255, driver="PNG")
    label = Label(Pair(image, mask), Raster(image, [1, 2, 3]), 1.0)
    assert label.road_fraction() == pytest.approx(6 / 64)


@pytest.mark.parametrize("transform", [GRID * Affine.translation(0.1, -0.1),  # rounding of an exported origin
                                       Affine(0.5, 0, 500000, 0, -0.5, 5000000)])  # the same grid written anew
def test_mask_on_the_image_grid_within_a_fraction_of_a_pixel(tmp_path, transform):
    image = write_raster(tmp_path / "img.tif", np.zeros((3, 64, 64), np.uint8))
    mask = write_raster(tmp_path / "mask.tif", road_mask(), transform=transform)
    Label(Pair(image, mask), Raster(image, [1, 2, 3]), 1.0)


def test_a_nodata_value_for_unknown_pixels_is_kept(tmp_path):
    """nodata=255 on a 0/1 mask marks unknown pixels: background stays, so the mask is accepted."""
    truth = road_mask()
    truth[:16] = 255
    image = write_raster(tmp_path / "img.tif", np.zeros((3, 64, 64), np.uint8))
    label = Label(Pair(image, write_raster(tmp_path / "mask.tif", truth, nodata=255)), Raster(image, [1, 2, 3]), 1.0)
    assert (label.read(0, 0, 16, 64) == 255).all()
    assert label.road_fraction() == pytest.approx(6 / 48)


@pytest.mark.parametrize("argv", [[], ["evaluate"], ["predict", "m.onnx", "r.tif", "--out", "o", "--batch", "0"]])
def test_command_line_errors_are_error_events(argv):
    code, events, stderr = run_cli(*argv)
    assert code == 2
    (error,) = errors(events)
    assert error["message"].startswith("road-sslkd") and "--help" in error["hint"]
    assert "usage: road-sslkd" in stderr
