"""`road-sslkd predict`: GeoTIFF grids, resampling, nodata, centrelines, bad input (real rasterio + ORT)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from rasterio.control import GroundControlPoint
from rasterio.transform import Affine, from_origin

from road_sslkd import predict
from road_sslkd.events import UserError
from road_sslkd.onnx_runtime import load_model
from test_engine import OURS, band_net, tiny_net, write_model

# ../shared beside the repository (never copied into it)
FIXTURE = (Path(__file__).resolve().parents[3] / "shared" / "data" / "geotiff_io_fixtures"
           / "spacenet_vegas_RGB-PanSharpen_img0_apls.tif")
# band_net with these keys predicts band 1 / 255: the output GeoTIFF is band 1 wherever nothing is resampled.
IDENTITY = {"tile_size": 64, "tiles_overlap": 25, "standardization_mean": 0.0, "standardization_std": 1.0,
            "seg_thresh": 0.5, "road_sslkd_output": "probabilities"}


def write_raster(path: Path, data: np.ndarray, res: float | None = 0.5, crs="EPSG:32633", nodata=None):
    transform = from_origin(500_000, 4_000_000, res, res) if res else Affine.identity()
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=len(data),
                       dtype=data.dtype, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(data)
    return path


def identity_model(tmp_path: Path, resolution_cm: float | None = 50.0, bands: int = 3):
    meta = {**IDENTITY, **({"resolution": resolution_cm} if resolution_cm else {})}
    name = f"identity_{resolution_cm}_{bands}.onnx"
    return load_model(write_model(tmp_path / name, band_net(bands), meta, bands=bands), "cpu", 1)


def run_cli(*argv) -> None:
    """Run the sub-command through its own parser (the full CLI imports every other command)."""
    parser = argparse.ArgumentParser()
    predict.register(parser.add_subparsers())
    args = parser.parse_args(["predict", *map(str, argv)])
    args.func(args)


def events_of(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.skipif(not FIXTURE.exists(), reason=f"real GeoTIFF fixture absent: {FIXTURE}")
def test_fixture_grid_round_trip(tmp_path, capsys):
    model = write_model(tmp_path / "m.onnx", tiny_net(), {**OURS, "tile_size": 256, "resolution": None})
    run_cli(model, FIXTURE, "--out", tmp_path / "out", "--threads", 1)
    out = tmp_path / "out" / f"{FIXTURE.stem}{predict.PROBABILITY_SUFFIX}"
    with rasterio.open(FIXTURE) as src, rasterio.open(out) as dst:
        assert (dst.crs, dst.transform, dst.shape) == (src.crs, src.transform, src.shape)
        assert np.allclose(predict.ground_resolution_m(src), (0.242, 0.301), atol=0.002)  # EPSG:4326 at 36 N
        assert dst.count == 1 and dst.dtypes[0] == "uint8" and dst.compression.name == "deflate"
        assert dst.block_shapes[0] == (256, 256)
    kinds = [(e["event"], e.get("kind")) for e in events_of(capsys)]
    assert ("artifact", "probability") in kinds and kinds[-1][0] == "done"
    assert ("progress", None) in kinds and not list((tmp_path / "out").glob(".*"))


@pytest.mark.parametrize(("given", "used"), [((), 0.3), (("--threshold", 0.6), 0.6)], ids=["model's", "given"])
def test_done_says_the_threshold_its_masks_use(tmp_path, capsys, given, used):
    """The plugin thresholds the backend's probabilities itself when QGIS lacks onnxruntime: it takes the
    model's threshold (seg_thresh) from the done event."""
    model = write_model(tmp_path / "m.onnx", band_net(3), {**IDENTITY, "seg_thresh": 0.3}, bands=3)
    raster = write_raster(tmp_path / "r.tif", np.full((3, 40, 50), 90, np.uint8))
    run_cli(model, raster, "--out", tmp_path / "out", "--threads", 1, *given)
    done = events_of(capsys)[-1]
    assert done["event"] == "done" and done["threshold"] == used


def test_same_resolution_is_not_resampled(tmp_path):
    checker = (np.indices((96, 128)).sum(axis=0) % 2 * 255).astype(np.uint8)
    raster = write_raster(tmp_path / "r.tif", np.stack([checker] * 3), res=0.5)
    out = tmp_path / "p.tif"
    assert predict.predict_file(identity_model(tmp_path, 51.0), raster, out)
    with rasterio.open(out) as dst:
        np.testing.assert_array_equal(dst.read(1), checker)


def test_other_resolution_is_resampled_and_brought_back(tmp_path):
    checker = (np.indices((96, 128)).sum(axis=0) % 2 * 255).astype(np.uint8)
    raster = write_raster(tmp_path / "r.tif", np.stack([checker] * 3), res=0.5)
    out = tmp_path / "p.tif"
    assert predict.predict_file(identity_model(tmp_path, 100.0), raster, out)
    with rasterio.open(raster) as src, rasterio.open(out) as dst:
        assert (dst.crs, dst.transform, dst.shape) == (src.crs, src.transform, src.shape)
        inner = dst.read(1)[4:-4, 4:-4].astype(float)
    # At 1 m a 0.5 m checkerboard is uniform grey: the model saw the raster at its own resolution.
    assert abs(inner.mean() - 127.5) < 4 and inner.std() < 8
    assert not list(tmp_path.glob(".*"))


def test_nodata_becomes_the_output_mask(tmp_path):
    data = np.full((3, 80, 90), 200, np.uint8)
    data[:, 20:40, 30:60] = 0
    raster = write_raster(tmp_path / "r.tif", data, nodata=0)
    out = tmp_path / "p.tif"
    predict.predict_file(identity_model(tmp_path), raster, out)
    with rasterio.open(out) as dst:
        mask, values = dst.dataset_mask(), dst.read(1)
    assert (mask[20:40, 30:60] == 0).all() and mask.sum() == 255 * (80 * 90 - 20 * 30)
    assert (values[20:40, 30:60] == 0).all() and (values[mask > 0] == 200).all()


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_raster_without_crs_works_in_pixel_space(tmp_path, capsys):
    data = np.zeros((3, 120, 100), np.uint8)
    data[:, 55:65, :] = 255
    raster = write_raster(tmp_path / "plain.tif", data, res=None, crs=None)
    run_cli(write_model(tmp_path / "m.onnx", band_net(), IDENTITY), raster, "--out", tmp_path, "--vector")
    with rasterio.open(tmp_path / f"plain{predict.PROBABILITY_SUFFIX}") as dst:
        assert dst.crs is None and dst.transform == Affine.identity() and dst.shape == (120, 100)
    crs, lines, lengths = read_lines(tmp_path / f"plain{predict.CENTRELINES_SUFFIX}")
    assert crs is None and 80 < lengths.sum() < 101  # length_m: in pixels here
    assert any("no CRS" in e.get("message", "") for e in events_of(capsys))


def cross_raster(tmp_path: Path) -> Path:
    """A 200 m x 200 m raster (1 m pixels) with a 9 m wide cross of roads and a 4 m stub on one arm."""
    data = np.zeros((3, 200, 200), np.uint8)
    data[:, 96:105, :] = 255
    data[:, :, 96:105] = 255
    data[:, 105:109, 150:153] = 255  # a stub off the east arm: its skeleton is a spur to prune
    return write_raster(tmp_path / "cross.tif", data, res=1.0)


def read_lines(path: Path):
    meta, _, geometry, (lengths,) = pyogrio.raw.read(path)
    return meta["crs"], shapely.from_wkb(geometry), lengths


@pytest.mark.parametrize("strip_rows", [1024, 48])
def test_cross_gives_four_arms_with_lengths(tmp_path, monkeypatch, strip_rows):
    monkeypatch.setattr(predict, "STRIP_ROWS", strip_rows)
    out = tmp_path / "p.tif"
    predict.predict_file(identity_model(tmp_path, 100.0), cross_raster(tmp_path), out)
    count = predict.write_centrelines(out, tmp_path / "c.gpkg", threshold=0.5, spur_m=10.0)
    crs, lines, lengths = read_lines(tmp_path / "c.gpkg")
    assert crs == "EPSG:32633" and count == len(lines) == 4  # four arms meeting at the junction
    np.testing.assert_allclose(lengths, shapely.length(lines), rtol=1e-6)  # metric CRS: metres = map units
    assert 370 < lengths.sum() < 410
    x0, y0, x1, y1 = shapely.total_bounds(lines)
    assert 500_000 <= x0 < x1 <= 500_200 and 3_999_800 <= y0 < y1 <= 4_000_000


def test_centrelines_command_vectorises_a_probability_raster(tmp_path):
    """`road-sslkd centrelines`: the lines `predict --vector` writes, from a probability GeoTIFF made earlier."""
    from road_sslkd import centrelines

    parser = argparse.ArgumentParser()
    centrelines.register(parser.add_subparsers())

    def run(*argv) -> None:
        args = parser.parse_args(["centrelines", *map(str, argv)])
        args.func(args)

    probability = tmp_path / "p.tif"
    predict.predict_file(identity_model(tmp_path, 100.0), cross_raster(tmp_path), probability)
    run(probability, "--out", tmp_path / "lines.gpkg", "--threshold", 0.5)
    crs, lines, lengths = read_lines(tmp_path / "lines.gpkg")
    assert crs == "EPSG:32633" and len(lines) == 4 and 370 < lengths.sum() < 410
    with pytest.raises(UserError, match="exists") as err:
        run(probability, "--out", tmp_path / "lines.gpkg")
    assert "--overwrite" in err.value.hint
    (tmp_path / "lines.gpkg").write_bytes(b"stale")
    run(probability, "--out", tmp_path / "lines.gpkg", "--overwrite")
    assert len(read_lines(tmp_path / "lines.gpkg")[1]) == 4
    for argv, said in ((["--out", tmp_path / "lines.shp"], "not a GeoPackage name"),
                       (["--out", tmp_path / "x.gpkg", "--threshold", 1.5], "outside")):
        with pytest.raises(UserError, match=said):
            run(probability, *argv)
    with pytest.raises(UserError, match="cannot read raster"):
        run(tmp_path / "missing.tif", "--out", tmp_path / "y.gpkg")
    assert not (tmp_path / "x.gpkg").exists() and not (tmp_path / "y.gpkg").exists()


def test_centrelines_command_refuses_or_warns_about_rasters_of_no_probability(tmp_path, capsys):
    """A float 0-1 or multi-band raster is refused; a 0/1 road mask gives no line, and a warning that says why
    (not an empty GeoPackage alone)."""
    from road_sslkd import centrelines

    parser = argparse.ArgumentParser()
    centrelines.register(parser.add_subparsers())

    def run(raster, out) -> None:
        args = parser.parse_args(["centrelines", str(raster), "--out", str(out)])
        args.func(args)

    road = np.zeros((1, 60, 60), np.uint8)
    road[:, 28:33, :] = 1
    for name, data, said in (("float.tif", road.astype(np.float32) * 0.9, "float32: a road probability raster is "
                              "uint8"), ("rgb.tif", np.repeat(road * 200, 3, axis=0), "3 bands")):
        with pytest.raises(UserError, match=said):
            run(write_raster(tmp_path / name, data, res=1.0), tmp_path / f"{name}.gpkg")
        assert not (tmp_path / f"{name}.gpkg").exists()
    capsys.readouterr()
    run(write_raster(tmp_path / "mask.tif", road, res=1.0), tmp_path / "mask.gpkg")
    assert len(read_lines(tmp_path / "mask.gpkg")[1]) == 0
    warnings = [e["message"] for e in events_of(capsys) if e["event"] == "warning"]
    assert len(warnings) == 1 and "no pixel reaches the threshold 0.5 (128 of 255; the highest is 1)" in warnings[0]
    assert "road mask (0/1)" in warnings[0]


def test_skeleton_paths_prune_short_spurs_only():
    skeleton = np.zeros((40, 40), bool)
    skeleton[20, 2:39] = True  # a road
    skeleton[21:25, 10] = True  # a 4 px spur
    skeleton[21:35, 30] = True  # a 14 px side road
    paths = predict.skeleton_paths(skeleton, min_spur=8)
    assert sorted(len(p) for p in paths) == [9, 9, 15, 21]


def test_tta_gives_a_mirrored_raster_the_mirrored_probabilities(tmp_path):
    """--tta averages each tile over its 8 flips and rotations; the network alone is not mirror-symmetric."""
    model = write_model(tmp_path / "m.onnx", tiny_net(), {**OURS, "resolution": None})  # tiles of 64 px
    pixels = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    for name, data in (("plain", pixels), ("mirrored", np.ascontiguousarray(pixels[..., ::-1]))):
        write_raster(tmp_path / f"{name}.tif", data)

    def predicted(*flags: str) -> tuple[np.ndarray, np.ndarray]:
        out = tmp_path / ("tta" if flags else "one_pass")
        run_cli(model, tmp_path / "plain.tif", tmp_path / "mirrored.tif", "--out", out, "--threads", 1, *flags)
        with rasterio.open(out / f"plain{predict.PROBABILITY_SUFFIX}") as a, \
                rasterio.open(out / f"mirrored{predict.PROBABILITY_SUFFIX}") as b:
            return a.read(1).astype(int), b.read(1)[:, ::-1].astype(int)

    plain, mirrored = predicted()
    assert np.abs(plain - mirrored).max() > 2
    plain, mirrored = predicted("--tta")
    assert np.abs(plain - mirrored).max() <= 1  # uint8 rounding of equal means summed in another order


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    model = write_model(tmp_path / "m.onnx", band_net(), IDENTITY)
    raster = write_raster(tmp_path / "r.tif", np.zeros((3, 40, 40), np.uint8))
    (tmp_path / "out").mkdir()
    existing = tmp_path / "out" / f"r{predict.PROBABILITY_SUFFIX}"
    existing.write_bytes(b"old")
    with pytest.raises(UserError, match="already exists") as err:
        run_cli(model, raster, "--out", tmp_path / "out")
    assert "--overwrite" in err.value.hint and existing.read_bytes() == b"old"
    run_cli(model, raster, "--out", tmp_path / "out", "--overwrite")
    with rasterio.open(existing) as dst:
        assert dst.shape == (40, 40)


def test_bad_inputs_name_the_file_and_the_fix(tmp_path):
    model = write_model(tmp_path / "m.onnx", band_net(), IDENTITY)
    gray = write_raster(tmp_path / "gray.tif", np.zeros((1, 40, 40), np.uint8))
    with pytest.raises(UserError, match="gray.tif has 1 band") as err:
        run_cli(model, gray, "--out", tmp_path / "out")
    assert "--bands" in err.value.hint
    text = tmp_path / "notes.tif"
    text.write_text("not a raster")
    with pytest.raises(UserError, match="cannot read raster .*notes.tif"):
        run_cli(model, text, "--out", tmp_path / "out")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00garbage" * 20)
    with pytest.raises(UserError, match="corrupt.onnx"):
        run_cli(corrupt, gray, "--out", tmp_path / "out")
    with pytest.raises(UserError, match="--bands 1,2"):
        run_cli(model, gray, "--out", tmp_path / "out", "--bands", "1,2")
    assert not (tmp_path / "out").exists()


def test_cancelled_prediction_leaves_nothing(tmp_path):
    raster = write_raster(tmp_path / "r.tif", np.zeros((3, 200, 200), np.uint8))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for resolution in (50.0, 100.0):  # direct and resampled paths
        model = identity_model(tmp_path, resolution)
        assert not predict.predict_file(model, raster, out_dir / "p.tif", cancelled=lambda: True)
        assert not list(out_dir.iterdir())


# IDENTITY at the test rasters' 0.5 m: no warning about missing metadata.
AT_HALF_METRE = {**IDENTITY, "resolution": 50}


def banded_raster(path: Path, dtype: str = "uint8") -> Path:
    """Three bands of constant, distinct values (10, 20, 200): a band_net output names the band it was fed."""
    return write_raster(path, np.stack([np.full((40, 40), v, dtype) for v in (10, 20, 200)]))


def test_default_bands_are_the_training_bands_and_other_bands_warn(tmp_path, capsys):
    """A model trained on bands 3,2,1 reads 3,2,1 unless told otherwise; other bands work with a warning."""
    meta = {**AT_HALF_METRE, "road_sslkd_training": {"bands": [3, 2, 1], "preset": "tiny"}}
    model = write_model(tmp_path / "bgr.onnx", band_net(), meta)
    raster = banded_raster(tmp_path / "r.tif")

    def first_band_fed(*flags: str) -> int:
        out = tmp_path / f"out{len(flags)}"
        run_cli(model, raster, "--out", out, *flags)
        with rasterio.open(out / f"r{predict.PROBABILITY_SUFFIX}") as dst:
            return int(np.median(dst.read(1)))

    assert first_band_fed() == 200
    assert not [e for e in events_of(capsys) if e["event"] == "warning"]
    assert first_band_fed("--bands", "1,2,3") == 10
    warnings = [e["message"] for e in events_of(capsys) if e["event"] == "warning"]
    assert len(warnings) == 1 and "trained on bands 3,2,1 but reads bands 1,2,3 of" in warnings[0]
    assert "--bands 3,2,1" in warnings[0] and "r.tif" in warnings[0]
    # A raster without band 4 of a model trained on 4,3,2: its first bands, with the same warning.
    nir = {**AT_HALF_METRE, "road_sslkd_training": {"bands": [4, 3, 2]}}
    four = write_model(tmp_path / "nir.onnx", band_net(), nir)
    run_cli(four, raster, "--out", tmp_path / "nir")
    assert any("trained on bands 4,3,2 but reads bands 1,2,3" in e.get("message", "") for e in events_of(capsys))


def test_another_data_type_than_training_warns_and_names_the_fix(tmp_path, capsys):
    trained_on_bytes = write_model(tmp_path / "u8.onnx", band_net(), {
        **AT_HALF_METRE, "road_sslkd_training": {"bands": [1, 2, 3], "dtype": "uint8"}})
    wide = banded_raster(tmp_path / "wide.tif", "uint16")
    run_cli(trained_on_bytes, wide, banded_raster(tmp_path / "byte.tif"), "--out", tmp_path / "out")
    warnings = [e["message"] for e in events_of(capsys) if e["event"] == "warning"]
    assert len(warnings) == 1 and warnings[0].startswith(f"{wide} is uint16 but the model was trained on uint8")
    assert "gdal_translate -ot Byte -scale" in warnings[0] and "train a model on this kind of imagery" in warnings[0]
    # Models that do not record it (older runs, Deepness models) stay silent.
    run_cli(write_model(tmp_path / "old.onnx", band_net(), AT_HALF_METRE), wide, "--out", tmp_path / "old")
    assert not [e for e in events_of(capsys) if e["event"] == "warning"]


def test_export_records_the_training_bands_and_data_type(tmp_path):
    """A run on uint16 imagery, bands 3,2,1: its ONNX says so, and predict reads those bands by default."""
    from road_sslkd.config import make_config
    from road_sslkd.data import DatasetSpec, Normalizer
    from road_sslkd.export import export_run_model
    from road_sslkd.models import build_model
    from road_sslkd.runs import RunDir

    image = banded_raster(tmp_path / "image.tif", "uint16")
    mask = write_raster(tmp_path / "mask.tif", np.ones((1, 40, 40), np.uint8))
    config = make_config("tiny", bands=[3, 2, 1])
    run = RunDir.create(tmp_path / "run", config, DatasetSpec.from_lists([f"{image}::{mask}"], [], []))
    run.normalizer = Normalizer([0.5] * 3, [0.25] * 3)
    run.save_model("student_sslkd", build_model(config.student, 3, weights="none"))
    info = load_model(export_run_model(run, "student_sslkd", tmp_path / "student.onnx"), "cpu", 1).info
    assert (info.training_bands, info.training_dtype) == ((3, 2, 1), "uint16")
    assert info.default_bands(3) == [3, 2, 1] and info.default_bands(2) == [1, 2, 3]


def test_outputs_never_replace_an_input(tmp_path):
    model = write_model(tmp_path / "m.onnx", band_net(), IDENTITY)
    out = tmp_path / "out"
    out.mkdir()
    # An earlier result given as an input, and a raster whose result would take its name.
    earlier = banded_raster(out / f"scene{predict.PROBABILITY_SUFFIX}")
    scene = banded_raster(tmp_path / "scene.tif")
    before = earlier.read_bytes()
    with pytest.raises(UserError, match="would overwrite the input raster") as err:
        run_cli(model, earlier, scene, "--out", out, "--overwrite")
    assert "another --out" in err.value.hint and earlier.read_bytes() == before
    with pytest.raises(UserError, match="is a file") as err:
        run_cli(model, scene, "--out", scene)
    assert "folder" in err.value.hint


def test_predict_command_loads_no_torch():
    code = "import sys, road_sslkd.predict\nassert 'torch' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_far_resolutions_and_control_points_warn(tmp_path, capsys):
    """Imagery at 20x the model's pixel size, or placed by control points only: the result is poor, so say so."""
    model = write_model(tmp_path / "m.onnx", band_net(), AT_HALF_METRE)
    coarse = write_raster(tmp_path / "coarse.tif", np.full((3, 8, 8), 100, np.uint8), res=10.0)
    run_cli(model, coarse, banded_raster(tmp_path / "fine.tif"), "--out", tmp_path / "out")
    warnings = [e["message"] for e in events_of(capsys) if e["event"] == "warning"]
    assert len(warnings) == 1 and warnings[0].startswith(f"{coarse} has 10.00 m pixels but the model was trained "
                                                         "at 0.50 m: it is resampled 20x per side")
    placed = tmp_path / "gcp.tif"
    with rasterio.open(placed, "w", driver="GTiff", width=16, height=16, count=3, dtype="uint8",
                       gcps=[GroundControlPoint(0, 0, 500_000, 4_000_000), GroundControlPoint(16, 0, 500_008,
                             4_000_000), GroundControlPoint(0, 16, 500_000, 3_999_992)], crs="EPSG:32633") as dst:
        dst.write(np.full((3, 16, 16), 50, np.uint8))
    run_cli(model, placed, "--out", tmp_path / "gcp")
    warnings = [e["message"] for e in events_of(capsys) if e["event"] == "warning"]
    assert len(warnings) == 1 and "georeferenced by control points" in warnings[0] and "gdalwarp" in warnings[0]


def test_fixed_size_export_segments_like_the_dynamic_one(tmp_path):
    """`export --fixed-size` (for Deepness, which takes the tile size from the input's shape): height and width
    fixed at the run's tile, batch dynamic; it segments a raster of another size as the dynamic export does,
    and quantises (calibration tiles cut to its size)."""
    import onnx

    from road_sslkd import export
    from road_sslkd.config import make_config
    from road_sslkd.data import DatasetSpec, Normalizer
    from road_sslkd.models import build_model
    from road_sslkd.quantize import quantize_int8
    from road_sslkd.runs import RunDir

    image = banded_raster(tmp_path / "image.tif")
    mask = write_raster(tmp_path / "mask.tif", np.ones((1, 40, 40), np.uint8))
    config = make_config("tiny")
    run = RunDir.create(tmp_path / "run", config, DatasetSpec.from_lists([f"{image}::{mask}"], [], []))
    run.normalizer = Normalizer([0.5] * 3, [0.25] * 3)
    run.save()
    run.save_model("student_sslkd", build_model(config.student, 3, weights="none"))
    parser = argparse.ArgumentParser()
    export.register(parser.add_subparsers())
    for flags, name in (([], "dynamic"), (["--fixed-size"], "fixed")):
        args = parser.parse_args(["export", str(run.path), "--out", str(tmp_path / f"{name}.onnx"), *flags])
        args.func(args)
    graph = onnx.load(str(tmp_path / "fixed.onnx")).graph
    for value, channels in ((graph.input[0], 3), (graph.output[0], 1)):  # Deepness wants a square output too
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims == ["batch", channels, config.tile, config.tile], value.name
    info = load_model(tmp_path / "fixed.onnx", "cpu", 1).info
    assert (info.fixed_size, info.tile_size, info.fixed_batch) == (config.tile, config.tile, None)
    assert load_model(tmp_path / "dynamic.onnx", "cpu", 1).info.fixed_size is None
    scene = write_raster(tmp_path / "scene.tif", np.random.default_rng(0).integers(0, 255, (3, 90, 100), np.uint8))
    for name in ("dynamic", "fixed"):
        run_cli(tmp_path / f"{name}.onnx", scene, "--out", tmp_path / name)
    run_cli(tmp_path / "fixed.onnx", image, "--out", tmp_path / "small")  # 40 px: under one tile

    def probability(folder: str) -> np.ndarray:
        with rasterio.open(next((tmp_path / folder).glob("*.tif"))) as dataset:
            return dataset.read(1).astype(int)

    dynamic, fixed = probability("dynamic"), probability("fixed")
    assert dynamic.shape == (90, 100) and np.abs(dynamic - fixed).max() <= 1
    assert probability("small").shape == (40, 40)
    int8 = quantize_int8(tmp_path / "fixed.onnx", tmp_path / "fixed.int8.onnx")
    assert load_model(int8, "cpu", 1).info.fixed_size == config.tile
