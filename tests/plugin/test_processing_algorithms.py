"""The Processing provider's algorithms: ``processing.run`` in this QGIS, and ``qgis_process`` as a subprocess."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, ogr, osr
from qgis.core import (
    QgsApplication,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputLayerDefinition,
    QgsProcessingParameterDefinition,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from segment_data import BACKEND_PYTHON, expected_probability, make_model, make_raster

from conftest import REPO, needs_backend
from road_sslkd_plugin.core import settings
from road_sslkd_plugin.provider import RoadSSLKDProvider

pytestmark = needs_backend  # the test models are written with the backend venv's onnx package

PROCESSING_PLUGINS = "/usr/share/qgis/python/plugins"
QGIS_PROCESS = shutil.which("qgis_process.bin", path="/usr/bin:/usr/local/bin") or shutil.which("qgis_process")


@pytest.fixture(scope="module")
def processing(qgis_app):
    if PROCESSING_PLUGINS not in sys.path:
        sys.path.append(PROCESSING_PLUGINS)
    import processing
    from processing.core.Processing import Processing

    Processing.initialize()
    registry = QgsApplication.processingRegistry()
    provider = None
    if registry.providerById("road_sslkd") is None:
        provider = RoadSSLKDProvider()
        registry.addProvider(provider)
    yield processing
    if provider is not None:
        registry.removeProvider(provider)


BACKEND_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def backend_python(code: str, *args: str) -> str:
    """stdout of ``code`` run by the backend venv's Python (onnx, rasterio: packages QGIS's Python lacks)."""
    result = subprocess.run([str(BACKEND_PYTHON), "-c", code, *args], capture_output=True, text=True, timeout=120,
                            check=False, env=BACKEND_ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("processing")
    return {
        "raster": folder / "scene.tif",
        "pixels": make_raster(folder / "scene.tif"),
        "one_band": folder / "gray.tif",
        "gray": make_raster(folder / "gray.tif", bands=1),
        "model": make_model(folder / "pointwise.onnx"),
        "classifier": make_model(folder / "classifier.onnx", kind="classifier"),
        # Trained on bands 3,2,1 of 8-bit imagery: it reads band 3 where the plain model reads band 1.
        "bgr": make_model(folder / "bgr.onnx", resolution_cm=50.0, training={"bands": [3, 2, 1], "dtype": "uint8"}),
        "thresh02": make_model(folder / "thresh02.onnx", threshold=0.2),
    }


class Feedback(QgsProcessingFeedback):
    """Keeps the warnings, errors and backend log lines an algorithm pushes."""

    def __init__(self) -> None:
        super().__init__()
        self.warnings: list[str] = []
        self.errors: list[str] = []
        self.debug: list[str] = []

    def pushWarning(self, warning: str) -> None:  # noqa: N802 - QGIS's API
        self.warnings.append(warning)
        super().pushWarning(warning)

    def reportError(self, error: str, fatal: bool = False) -> None:  # noqa: N802
        self.errors.append(error)
        super().reportError(error, fatal)

    def pushDebugInfo(self, info: str) -> None:  # noqa: N802
        self.debug.append(info)
        super().pushDebugInfo(info)


def _read(path) -> np.ndarray:
    dataset = gdal.Open(str(path))
    values = dataset.GetRasterBand(1).ReadAsArray()
    dataset = None
    return values


def _off_by(path, band: np.ndarray) -> int:
    """Largest difference between an output and the model's probability of ``band``, outside the nodata corner."""
    return int(np.abs(_read(path)[10:, 10:].astype(int) - expected_probability(band)[10:, 10:]).max())


def _centrelines(path) -> tuple[str, int, float, QgsRectangle]:
    """CRS, line count, total length_m and extent of a centrelines GeoPackage. The layer lives in this frame
    only: a test frame kept by a pytest.raises traceback would keep it to Python's exit, where QGIS crashes."""
    layer = QgsVectorLayer(f"{path}|layername=centrelines", "lines", "ogr")
    assert layer.isValid(), path
    return layer.crs().authid(), layer.featureCount(), sum(f["length_m"] for f in layer.getFeatures()), layer.extent()


def test_segment_roads_writes_probability_and_mask(processing, data, tmp_path):
    out, mask = tmp_path / "prob.tif", tmp_path / "mask.tif"
    result = processing.run(
        "road_sslkd:segment_roads",
        {
            "INPUT": str(data["raster"]),
            "MODEL": str(data["model"]),
            "OUTPUT": str(out),
            "MASK": str(mask),
            "THRESHOLD": 0.3,  # 76.5 of 255: 76 is below it, though it rounds to 76
        },
    )
    assert result["OUTPUT"] == str(out) and result["MASK"] == str(mask)
    values = _read(out)
    assert _off_by(out, data["pixels"][0]) <= 1
    binary = _read(mask)
    assert set(np.unique(binary)) <= {0, 1}
    assert (values[10:, 10:] == 76).any() and (binary[10:, 10:] == (values[10:, 10:] >= 77)).all()
    layer = QgsRasterLayer(str(out), "p", "gdal")
    assert layer.crs().authid() == "EPSG:32633" and layer.extent() == QgsRasterLayer(str(data["raster"]), "s").extent()


def test_segment_roads_writes_centrelines_with_the_backend(processing, data, tmp_path):
    """CENTRELINES: the road mask's centre lines as a GeoPackage line layer (the backend vectorises them)."""
    lines = tmp_path / "lines.gpkg"
    result = processing.run(
        "road_sslkd:segment_roads",
        {"INPUT": str(data["raster"]), "MODEL": str(data["model"]), "OUTPUT": str(tmp_path / "prob.tif"),
         "THRESHOLD": 0.6, "CENTRELINES": str(lines), "SPUR_LENGTH": 2.0},
    )  # fmt: skip
    assert result["CENTRELINES"] == str(lines)
    crs, count, total, extent = _centrelines(lines)
    assert crs == "EPSG:32633" and count >= 1
    scene = QgsRasterLayer(str(data["raster"]), "s").extent()
    assert 20 < total < 2 * math.hypot(scene.width(), scene.height())  # the diagonal road, give or take spurs
    assert scene.contains(extent)
    with pytest.raises(QgsProcessingException, match=r"CENTRELINES .*lines.shp is not a GeoPackage name"):
        processing.run(
            "road_sslkd:segment_roads",
            {"INPUT": str(data["raster"]), "MODEL": str(data["model"]), "OUTPUT": str(tmp_path / "p2.tif"),
             "CENTRELINES": str(tmp_path / "lines.shp")},
        )  # fmt: skip
    assert not (tmp_path / "p2.tif").exists()
    # The same lines from the probability raster alone (road_sslkd:centrelines), as the map action writes it.
    again = tmp_path / "again.gpkg"
    processing.run("road_sslkd:centrelines", {"INPUT": str(tmp_path / "prob.tif"), "THRESHOLD": 0.6,
                                              "SPUR_LENGTH": 2.0, "CENTRELINES": str(again)})
    assert _centrelines(again)[2] == pytest.approx(total)


def test_centrelines_say_why_they_are_empty_or_refused(processing, data, tmp_path):
    """road_sslkd:centrelines on Segment roads' MASK (0/1) instead of its probability: the backend's warning that
    no pixel reaches the threshold reaches the feedback; a 3-band image is refused in the backend's words."""
    mask = tmp_path / "mask.tif"
    processing.run("road_sslkd:segment_roads", {"INPUT": str(data["raster"]), "MODEL": str(data["model"]),
                                                "OUTPUT": str(tmp_path / "prob.tif"), "MASK": str(mask)})
    feedback = Feedback()
    result = processing.run("road_sslkd:centrelines", {"INPUT": str(mask), "CENTRELINES": str(tmp_path / "m.gpkg")},
                            feedback=feedback)  # fmt: skip
    assert _centrelines(result["CENTRELINES"])[1] == 0
    assert any("the highest is 1" in w and "road mask (0/1)" in w for w in feedback.warnings), feedback.warnings
    with pytest.raises(QgsProcessingException, match="has 3 bands: a road probability raster has one"):
        processing.run("road_sslkd:centrelines",
                       {"INPUT": str(data["raster"]), "CENTRELINES": str(tmp_path / "i.gpkg")})
    assert not (tmp_path / "i.gpkg").exists()


def test_segment_roads_averages_eight_views_back_in_place(processing, data, tmp_path):
    """TTA: each tile's 8 flips and rotations, each turned back; a per-pixel model must come out unchanged."""
    out = tmp_path / "tta.tif"
    processing.run("road_sslkd:segment_roads",
                   {"INPUT": str(data["raster"]), "MODEL": str(data["model"]), "OUTPUT": str(out), "TTA": True})
    assert _off_by(out, data["pixels"][0]) <= 1


def test_segment_roads_extent_in_another_crs(processing, data, tmp_path):
    out = tmp_path / "part.tif"
    # The scene's top-left quarter, given in WGS 84 (x_min, x_max, y_min, y_max [CRS]).
    layer = QgsRasterLayer(str(data["raster"]), "scene", "gdal")
    from qgis.core import QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsRectangle

    part = QgsRectangle(500_000, 4_999_975, 500_030, 5_000_000)
    wgs = QgsCoordinateTransform(layer.crs(), QgsCoordinateReferenceSystem("EPSG:4326"), QgsProject.instance())
    box = wgs.transformBoundingBox(part)
    extent = f"{box.xMinimum()},{box.xMaximum()},{box.yMinimum()},{box.yMaximum()} [EPSG:4326]"
    processing.run(
        "road_sslkd:segment_roads",
        {"INPUT": str(data["raster"]), "MODEL": str(data["model"]), "EXTENT": extent, "OUTPUT": str(out)},
    )
    result = QgsRasterLayer(str(out), "part", "gdal")
    assert result.extent().contains(part)
    assert result.extent().width() < 60  # not the whole 60 m scene


@pytest.mark.parametrize("in_process", [True, False], ids=["in QGIS", "backend"])
def test_the_mask_is_drawn_at_the_models_threshold_on_both_paths(processing, data, tmp_path, monkeypatch,
                                                                 in_process):
    """MASK without THRESHOLD: the model's seg_thresh (0.2), also where `road-sslkd predict` runs the model."""
    from road_sslkd_plugin.core import segment

    if not in_process:
        monkeypatch.setattr(segment, "engine_available", lambda: False)
    out, mask = tmp_path / "prob.tif", tmp_path / "mask.tif"
    processing.run("road_sslkd:segment_roads", {"INPUT": str(data["raster"]), "MODEL": str(data["thresh02"]),
                                                "OUTPUT": str(out), "MASK": str(mask)})
    probability = _read(out)
    assert ((probability >= 51) & (probability < 128)).any()  # road at 0.2, not at 0.5: the test can tell
    assert (_read(mask) == (probability >= 0.2 * 255)).all()


def test_backend_path_streams_a_whole_file_past_the_copy_limit(processing, data, tmp_path, monkeypatch):
    """Without onnxruntime in QGIS, a layer segmented whole goes to `road-sslkd predict` as its file: no copy in
    memory, so no size limit; a part of it (EXTENT) is still copied, within the limit."""
    from road_sslkd_plugin.algorithms import segment_roads
    from road_sslkd_plugin.core import segment

    monkeypatch.setattr(segment, "engine_available", lambda: False)  # our switch, not onnxruntime itself
    monkeypatch.setattr(segment_roads, "MAX_PIXELS", 100)  # the scene has 12 000 pixels
    out = tmp_path / "whole.tif"
    processing.run("road_sslkd:segment_roads", {"INPUT": str(data["raster"]), "MODEL": str(data["model"]),
                                                "OUTPUT": str(out), "MASK": str(tmp_path / "mask.tif")})
    assert _off_by(out, data["pixels"][0]) <= 1
    assert (_read(tmp_path / "mask.tif")[10:, 10:] == (_read(out)[10:, 10:] >= 128)).all()
    with pytest.raises(QgsProcessingException, match="Mpx limit"):
        processing.run("road_sslkd:segment_roads", {
            "INPUT": str(data["raster"]), "MODEL": str(data["model"]), "OUTPUT": str(tmp_path / "part.tif"),
            "EXTENT": "500000,500030,4999975,5000000 [EPSG:32633]"})


@pytest.mark.parametrize(
    "case, message",
    [
        ("classifier", "is not a segmentation model"),
        ("one_band", "has 1 band, the model needs 3"),
        ("outside", "does not overlap the layer"),
        ("threshold", "Incorrect parameter value for THRESHOLD"),  # Processing's own range check (0.001-0.999)
        ("missing", "model file not found"),
    ],
)
def test_segment_roads_bad_inputs_fail_clearly_and_write_nothing(processing, data, tmp_path, case, message):
    params = {"INPUT": str(data["raster"]), "MODEL": str(data["model"]), "OUTPUT": str(tmp_path / "out.tif")}
    if case == "classifier":
        params["MODEL"] = str(data["classifier"])
    elif case == "one_band":
        params["INPUT"] = str(data["one_band"])
    elif case == "outside":
        params["EXTENT"] = "600000,600100,5100000,5100100 [EPSG:32633]"
    elif case == "threshold":
        params["THRESHOLD"] = 1.0
        params["MASK"] = str(tmp_path / "mask.tif")
    elif case == "missing":
        params["MODEL"] = str(tmp_path / "nowhere.onnx")
    with pytest.raises(QgsProcessingException, match=message):
        processing.run("road_sslkd:segment_roads", params)
    assert list(tmp_path.iterdir()) == []  # no half-written output


def test_an_empty_mask_in_batch_mode_means_no_mask(processing, data, tmp_path):
    """The batch panel passes an unfilled optional output as an empty definition tied to the project."""
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    out = tmp_path / "p.tif"
    processing.run("road_sslkd:segment_roads", {
        "INPUT": str(data["raster"]), "MODEL": str(data["model"]), "OUTPUT": str(out),
        "MASK": QgsProcessingOutputLayerDefinition("", QgsProject.instance())}, context=context)
    assert out.is_file() and "" not in context.layersToLoadOnCompletion()
    assert [p.name for p in tmp_path.iterdir()] == ["p.tif"]


def test_output_dialogs_offer_geotiff_only(processing):
    algorithm = QgsApplication.processingRegistry().algorithmById("road_sslkd:segment_roads")
    for name in ("OUTPUT", "MASK"):
        offered = algorithm.parameterDefinition(name).createFileFilter()
        assert "*.tif" in offered and "*.png" not in offered, offered


@pytest.mark.parametrize(
    "case, message",
    [
        ("output_is_input", "OUTPUT is the input layer's file .*scene.tif: writing it would destroy the image"),
        ("mask_is_input", "MASK is the input layer's file"),
        ("mask_is_output", "OUTPUT and MASK are both .*out.tif"),
        ("png", r"OUTPUT .*roads.png is not a GeoTIFF name.*\(roads.tif\)"),
        ("folder_is_a_file", "OUTPUT: The output folder cannot be created: .*scene.tif' is a file"),
        ("output_is_a_folder", "OUTPUT: cannot write .*taken.tif: Is a directory"),
    ],
)
def test_segment_roads_refuses_outputs_that_destroy_or_collide(processing, data, tmp_path, case, message):
    """Checked before the model runs (the last case fails at write time): the input stays, nothing is written."""
    scene = tmp_path / "scene.tif"
    shutil.copy(data["raster"], scene)
    before = scene.read_bytes()
    params = {"INPUT": str(scene), "MODEL": str(data["model"]), "OUTPUT": str(tmp_path / "out.tif")}
    if case == "output_is_input":
        params["OUTPUT"] = str(scene)
    elif case == "mask_is_input":
        params["MASK"] = str(scene)
    elif case == "mask_is_output":
        params["MASK"] = params["OUTPUT"]
    elif case == "png":
        params["OUTPUT"] = str(tmp_path / "roads.png")
    elif case == "folder_is_a_file":
        params["OUTPUT"] = str(scene / "out.tif")
    elif case == "output_is_a_folder":
        (tmp_path / "taken.tif").mkdir()
        params["OUTPUT"] = str(tmp_path / "taken.tif")
    with pytest.raises(QgsProcessingException, match=message):
        processing.run("road_sslkd:segment_roads", params)
    assert scene.read_bytes() == before
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    assert written == {"scene.tif", *(["taken.tif"] if case == "output_is_a_folder" else [])}


def test_segment_roads_reads_the_training_bands_unless_told(processing, data, tmp_path):
    """No BANDS: the model's training bands (3,2,1); BANDS 1,2,3 is obeyed, with a warning in BANDS's words."""
    pixels = data["pixels"]
    feedback = Feedback()
    processing.run("road_sslkd:segment_roads", {"INPUT": str(data["raster"]), "MODEL": str(data["bgr"]),
                                                "OUTPUT": str(tmp_path / "default.tif")}, feedback=feedback)
    assert _off_by(tmp_path / "default.tif", pixels[2]) <= 1
    assert feedback.warnings == []
    processing.run("road_sslkd:segment_roads", {"INPUT": str(data["raster"]), "MODEL": str(data["bgr"]),
                                                "BANDS": [1, 2, 3], "OUTPUT": str(tmp_path / "rgb.tif")},
                   feedback=feedback)
    assert _off_by(tmp_path / "rgb.tif", pixels[0]) <= 1
    assert len(feedback.warnings) == 1
    assert "trained on bands 3,2,1 but reads bands 1,2,3 of the layer scene" in feedback.warnings[0]
    assert "BANDS 3,2,1" in feedback.warnings[0] and "--bands" not in feedback.warnings[0]


def test_segment_roads_warns_when_the_data_type_is_not_the_training_one(processing, data, tmp_path):
    wide = tmp_path / "wide.tif"
    gdal.Translate(str(wide), str(data["raster"]), outputType=gdal.GDT_UInt16)
    feedback = Feedback()
    processing.run("road_sslkd:segment_roads", {"INPUT": str(wide), "MODEL": str(data["bgr"]),
                                                "OUTPUT": str(tmp_path / "p.tif")}, feedback=feedback)
    assert len(feedback.warnings) == 1
    assert feedback.warnings[0].startswith("the layer wide is uint16 but the model was trained on uint8 imagery")
    assert "gdal_translate -ot Byte -scale" in feedback.warnings[0]
    # A model that does not record its training data type (older runs, Deepness) says nothing about it.
    quiet = Feedback()
    processing.run("road_sslkd:segment_roads", {"INPUT": str(wide), "MODEL": str(data["model"]),
                                                "OUTPUT": str(tmp_path / "q.tif")}, feedback=quiet)
    assert quiet.warnings and not [w for w in quiet.warnings if "trained on" in w]  # only "no metadata resolution"


GRID_CODE = """
import json, sys, rasterio
from road_sslkd.predict import _model_grid
with rasterio.open(sys.argv[1]) as dataset:
    grid = _model_grid(dataset, float(sys.argv[2]))
print(json.dumps({"width": grid["width"], "height": grid["height"], "transform": list(grid["transform"])[:6]}))
"""


def test_geographic_layer_is_read_on_the_backends_grid(processing, tmp_path):
    """EPSG:4326 at 36 N, 0.5 m pixels: a 1 m model's grid has half the pixels on both axes, the one
    ``road-sslkd predict`` reads (a degree of longitude is cos(36) of a degree of latitude there)."""
    latitude, width, height = 36.0, 120, 100
    yres = 0.5 / 111_320.0
    xres = yres / math.cos(math.radians(latitude))
    path = tmp_path / "wgs84.tif"
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), width, height, 3, gdal.GDT_Byte)
    dataset.SetGeoTransform((15.0, xres, 0.0, latitude + height / 2 * yres, 0.0, -yres))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(4326)
    dataset.SetProjection(srs.ExportToWkt())
    for band in range(1, 4):
        dataset.GetRasterBand(band).Fill(100)
    dataset = None
    model = make_model(tmp_path / "one_metre.onnx", resolution_cm=100.0)
    processing.run("road_sslkd:segment_roads", {"INPUT": str(path), "MODEL": str(model),
                                                "OUTPUT": str(tmp_path / "roads.tif")})
    ours = gdal.Open(str(tmp_path / "roads.tif"))
    backend = json.loads(backend_python(GRID_CODE, str(path), "100"))
    assert (ours.RasterXSize, ours.RasterYSize) == (backend["width"], backend["height"]) == (60, 50)
    geotransform, transform = ours.GetGeoTransform(), backend["transform"]
    assert geotransform[1] == pytest.approx(transform[0], rel=1e-3) == pytest.approx(2 * xres, rel=1e-3)
    assert geotransform[5] == pytest.approx(transform[4], rel=1e-3) == pytest.approx(-2 * yres, rel=1e-3)
    ours = None


def test_algorithms_have_help_and_icons(processing):
    registry = QgsApplication.processingRegistry()
    for algorithm_id in ("road_sslkd:segment_roads", "road_sslkd:centrelines", "road_sslkd:train",
                         "road_sslkd:resume_training", "road_sslkd:evaluate"):
        algorithm = registry.algorithmById(algorithm_id)
        assert algorithm is not None, algorithm_id
        assert len(algorithm.shortHelpString()) > 100 and not algorithm.icon().isNull()
        assert Path(algorithm.svgIconPath()).name == "icon.svg"  # what the graphical modeler draws
        assert "roads" in algorithm.tags() and "onnx" in algorithm.tags()  # found by the toolbox's search
    train = registry.algorithmById("road_sslkd:train")
    advanced = {p.name() for p in train.parameterDefinitions()
                if int(p.flags()) & int(QgsProcessingParameterDefinition.Flag.FlagAdvanced)}
    assert advanced == {"SEED", "BANDS", "DEVICE", "CONFIG"}


def _plugin_folder(tmp_path: Path) -> Path:
    """A plugin folder like the zip's (metadata.txt, resources/) whose code links back to this checkout.

    The links keep ``Path(__file__).resolve()`` inside the checkout, so the backend is found in
    ``.venv-backend`` (``qgis_process`` runs the system Python, which has no onnxruntime).
    """
    plugins = tmp_path / "plugins"
    target = plugins / "road_sslkd_plugin"
    target.mkdir(parents=True)
    for item in (REPO / "road_sslkd_plugin").iterdir():
        if item.name != "__pycache__":
            (target / item.name).symlink_to(item)
    shutil.copy(REPO / "metadata.txt", target / "metadata.txt")
    (target / "resources").symlink_to(REPO / "resources")
    return plugins


@pytest.mark.skipif(QGIS_PROCESS is None, reason="qgis_process is not installed")
def test_qgis_process_lists_and_runs_segment_roads(data, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "QGIS"))}
    env.update(HOME=str(tmp_path / "home"), QGIS_PLUGINPATH=str(_plugin_folder(tmp_path)), QT_QPA_PLATFORM="offscreen")
    (tmp_path / "home").mkdir()

    def qgis_process(*args: str) -> subprocess.CompletedProcess:
        # The Debian wrapper script passes a flag the 3.22 binary rejects: call the binary itself.
        return subprocess.run([QGIS_PROCESS, *args], capture_output=True, text=True, timeout=300, env=env, check=False)

    enabled = qgis_process("plugins", "enable", "road_sslkd_plugin")
    assert enabled.returncode == 0 or "already enabled" in enabled.stdout + enabled.stderr, enabled.stderr[-2000:]
    listing = qgis_process("list")
    assert "road_sslkd:segment_roads" in listing.stdout and "road_sslkd:train" in listing.stdout
    out = tmp_path / "roads.tif"
    run = qgis_process(
        "--json", "run", "road_sslkd:segment_roads", "--",
        f"INPUT={data['raster']}", f"MODEL={data['model']}", f"OUTPUT={out}", f"MASK={tmp_path / 'mask.tif'}",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    results = json.loads(run.stdout)["results"]
    assert results["OUTPUT"] == str(out)
    assert _off_by(out, data["pixels"][0]) <= 1
    lines = qgis_process("--json", "run", "road_sslkd:centrelines", "--", f"INPUT={out}",
                         f"CENTRELINES={tmp_path / 'lines.gpkg'}")  # fmt: skip
    assert lines.returncode == 0, lines.stdout[-2000:] + lines.stderr[-2000:]
    assert json.loads(lines.stdout)["results"]["CENTRELINES"] == str(tmp_path / "lines.gpkg")
    bad = qgis_process("run", "road_sslkd:segment_roads", "--", f"INPUT={data['one_band']}",
                       f"MODEL={data['model']}", f"OUTPUT={tmp_path / 'bad.tif'}")  # fmt: skip
    said = bad.stdout + bad.stderr
    assert bad.returncode != 0 and "the layer gray has 1 band;" in said and "with BANDS" in said
    assert "--bands" not in said and not (tmp_path / "bad.tif").exists(), said
    # One band chosen for a three-band model: said as it is, in Processing's words.
    one = qgis_process("run", "road_sslkd:segment_roads", "--", f"INPUT={data['raster']}", f"MODEL={data['model']}",
                       "BANDS=1", f"OUTPUT={tmp_path / 'one.tif'}")  # fmt: skip
    said = one.stdout + one.stderr
    assert one.returncode != 0 and "BANDS 1: the model needs 3 band numbers" in said
    assert "has 1 band" not in said and "--bands" not in said
    # The backend reads the model's training bands (3,2,1) of the layer; BANDS 1,2,3 reads those, with a warning.
    run = qgis_process("run", "road_sslkd:segment_roads", "--", f"INPUT={data['raster']}", f"MODEL={data['bgr']}",
                       f"OUTPUT={tmp_path / 'bgr.tif'}")  # fmt: skip
    assert run.returncode == 0 and "trained on bands" not in run.stdout + run.stderr, run.stderr[-2000:]
    assert _off_by(tmp_path / "bgr.tif", data["pixels"][2]) <= 1  # band 3 went in first
    assert _off_by(tmp_path / "bgr.tif", data["pixels"][0]) > 5
    run = qgis_process("run", "road_sslkd:segment_roads", "--", f"INPUT={data['raster']}", f"MODEL={data['bgr']}",
                       "BANDS=1", "BANDS=2", "BANDS=3", f"OUTPUT={tmp_path / 'rgb.tif'}")  # fmt: skip
    said = run.stdout + run.stderr
    assert run.returncode == 0 and "reads bands 1,2,3 of the layer scene" in said and "BANDS 3,2,1" in said, said
    assert _off_by(tmp_path / "rgb.tif", data["pixels"][0]) <= 1


def test_train_checks_its_inputs(processing, data, tmp_path):
    with pytest.raises(QgsProcessingException, match="2 labelled images but 1 labels"):
        processing.run(
            "road_sslkd:train",
            {"LABELLED_IMAGES": [str(data["raster"]), str(data["one_band"])], "LABELS": [str(data["one_band"])],
             "PRESET": 0, "OUTPUT_FOLDER": str(tmp_path / "run")},
        )  # fmt: skip
    # The backend's own check: weights that are not there stop the run before it writes anything.
    with pytest.raises(QgsProcessingException, match="weights file or folder not found"):
        processing.run(
            "road_sslkd:train",
            {"LABELLED_IMAGES": [str(data["raster"])], "LABELS": [str(data["one_band"])], "PRESET": 0,
             "ENCODER_WEIGHTS": str(tmp_path / "no-weights"), "OUTPUT_FOLDER": str(tmp_path / "run")},
        )  # fmt: skip
    assert not (tmp_path / "run").exists()
    # One layer of a two-layer GeoPackage: the backend would read the first, so it must be saved alone first.
    gpkg = tmp_path / "roads.gpkg"
    source = ogr.GetDriverByName("GPKG").CreateDataSource(str(gpkg))
    for name in ("old", "new"):
        source.CreateLayer(name, None, ogr.wkbLineString)
    source = None
    with pytest.raises(QgsProcessingException, match="roads has no file of its own"):
        processing.run(
            "road_sslkd:train",
            {"LABELLED_IMAGES": [str(data["raster"])], "LABELS": [f"{gpkg}|layername=new"], "PRESET": 0,
             "OUTPUT_FOLDER": str(tmp_path / "run")},
        )  # fmt: skip
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "config.json").write_text("{}")
    with pytest.raises(QgsProcessingException, match="is not empty"):
        processing.run(
            "road_sslkd:train",
            {"LABELLED_IMAGES": [str(data["raster"])], "LABELS": [str(data["one_band"])], "PRESET": 0,
             "OUTPUT_FOLDER": str(tmp_path / "used")},
        )  # fmt: skip
    # The GUI's default for a folder destination (and a model's intermediate): QGIS would delete the run,
    # models included, on exit, so it goes to the dock's default place. (Missing weights then stop it early.)
    settings.set_user_value("output_folder", str(tmp_path / "runs"))
    feedback = Feedback()
    with pytest.raises(QgsProcessingException, match="weights file or folder not found"):
        processing.run(
            "road_sslkd:train",
            {"LABELLED_IMAGES": [str(data["raster"])], "LABELS": [str(data["one_band"])], "PRESET": 0,
             "ENCODER_WEIGHTS": str(tmp_path / "no-weights"), "OUTPUT_FOLDER": "TEMPORARY_OUTPUT"},
            feedback=feedback,
        )  # fmt: skip
    assert any(f"the run is kept in {tmp_path / 'runs' / 'run-'}" in w for w in feedback.warnings), feedback.warnings
    # Test pairs are checked like the labelled ones.
    with pytest.raises(QgsProcessingException, match="1 test images but 0 labels"):
        processing.run(
            "road_sslkd:train",
            {"LABELLED_IMAGES": [str(data["raster"])], "LABELS": [str(data["one_band"])], "PRESET": 0,
             "TEST_IMAGES": [str(data["raster"])], "OUTPUT_FOLDER": str(tmp_path / "run")},
        )  # fmt: skip
    # Bands the images lack, said in Processing's words before the backend starts.
    for images, bands, message in (([data["one_band"]], "", "gray has 1 band but an empty BANDS reads bands 1,2,3"),
                                   ([data["raster"]], "4,3,2", "scene has 3 bands but BANDS asks for band 4"),
                                   ([data["raster"]], "3,x", "BANDS '3,x' must be 1-based band numbers")):
        with pytest.raises(QgsProcessingException, match=message) as err:
            processing.run(
                "road_sslkd:train",
                {"LABELLED_IMAGES": [str(i) for i in images], "LABELS": [str(data["one_band"])], "PRESET": 0,
                 "BANDS": bands, "OUTPUT_FOLDER": str(tmp_path / "run")},
            )  # fmt: skip
        assert "--bands" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_train_runs_the_backend_and_returns_the_student(processing, demo_dir, tmp_path):
    """The tiny preset on the demo scenes: progress reaches the feedback, the student comes back as an output.

    The scenes lie in a folder whose name holds a ":", which must not split an IMAGE::LABEL pair."""
    demo_dir = Path(shutil.copytree(demo_dir, tmp_path / "scenes:2024"))
    split = json.loads((demo_dir / "split.json").read_text())
    images = [str(demo_dir / pair["image"]) for pair in split["labelled"]]
    labels = [str(demo_dir / pair["mask"]) for pair in split["labelled"]]
    progress = []

    feedback = QgsProcessingFeedback()
    feedback.progressChanged.connect(progress.append)
    run_dir = tmp_path / "run"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"val_every": 2}))
    test = split["test"][0]
    result = processing.run(
        "road_sslkd:train",
        {"LABELLED_IMAGES": images, "LABELS": labels, "UNLABELLED": [str(demo_dir / p) for p in split["unlabelled"]],
         "TEST_IMAGES": [str(demo_dir / test["image"])], "TEST_LABELS": [str(demo_dir / test["mask"])],
         "PRESET": 0, "STEPS_SCALE": 0.3, "SEED": 7, "BANDS": "1,2,3", "DEVICE": 1, "CONFIG": str(settings),
         "OUTPUT_FOLDER": str(run_dir)},
        feedback=feedback,
    )  # fmt: skip
    stored = json.loads((run_dir / "config.json").read_text())
    config = stored["config"]
    assert (config["seed"], config["bands"], config["val_every"]) == (7, [1, 2, 3], 2)  # the advanced parameters
    assert [pair["image"] for pair in stored["dataset"]["test"]] == [str(demo_dir / test["image"])]
    assert Path(result["MODEL"]).is_file() and result["MODEL"].endswith(".onnx")
    assert Path(result["REPORT"]).is_file()
    assert "student_sslkd" in json.loads(result["METRICS"]).get("models", json.loads(result["METRICS"]))
    assert progress and max(progress) > 50

    # road_sslkd:evaluate on the same run: its own test split, and the test pair given as layers.
    own = json.loads(processing.run("road_sslkd:evaluate", {"RUN": str(run_dir), "MODELS": "student_sslkd"})["METRICS"])
    assert 0.0 <= own["student_sslkd"]["iou"] <= 1.0
    evaluated = processing.run(
        "road_sslkd:evaluate",
        {"RUN": str(run_dir), "TEST_IMAGES": [str(demo_dir / test["image"])],
         "TEST_MASKS": [str(demo_dir / test["mask"])], "MODELS": "student_sslkd"},
    )  # fmt: skip
    metrics = json.loads(evaluated["METRICS"])
    assert set(metrics) == {"student_sslkd"} and 0.0 <= metrics["student_sslkd"]["iou"] <= 1.0
    # A run trained without test images: evaluate asks for them by their parameter names.
    stored["dataset"]["test"] = []
    (run_dir / "config.json").write_text(json.dumps(stored))
    with pytest.raises(QgsProcessingException, match="trained without test images: give TEST_IMAGES and TEST_MASKS"):
        processing.run("road_sslkd:evaluate", {"RUN": str(run_dir)})
    with pytest.raises(QgsProcessingException, match="not a Road SSLKD run folder"):
        processing.run("road_sslkd:evaluate", {"RUN": str(tmp_path)})


def test_a_cancelled_training_resumes_from_its_checkpoint(processing, demo_dir, tmp_path):
    """Cancel in the middle, then road_sslkd:resume_training: finished stages are skipped, the student comes back."""
    split = json.loads((demo_dir / "split.json").read_text())
    run_dir = tmp_path / "run"
    feedback = Feedback()
    feedback.progressChanged.connect(lambda percent: percent > 30 and feedback.cancel())
    stopped = processing.run(
        "road_sslkd:train",
        {"LABELLED_IMAGES": [str(demo_dir / pair["image"]) for pair in split["labelled"]],
         "LABELS": [str(demo_dir / pair["mask"]) for pair in split["labelled"]],
         "UNLABELLED": [str(demo_dir / p) for p in split["unlabelled"]], "PRESET": 0, "DEVICE": 1,
         "OUTPUT_FOLDER": str(run_dir)},
        feedback=feedback,
    )  # fmt: skip
    assert "MODEL" not in stopped and not (run_dir / "student.onnx").exists()
    assert any(f"Resume SSLKD training (RUN_FOLDER={run_dir})" in e for e in feedback.errors), feedback.errors
    feedback = Feedback()
    assert json.loads((run_dir / "config.json").read_text())["config"]["device"] == "cpu"
    result = processing.run("road_sslkd:resume_training", {"RUN_FOLDER": str(run_dir), "DEVICE": 1},
                            feedback=feedback)  # auto from here on, instead of the run's own cpu
    assert json.loads((run_dir / "config.json").read_text())["config"]["device"] == "auto"
    assert Path(result["MODEL"]).is_file() and result["OUTPUT_FOLDER"] == str(run_dir)
    assert "student_sslkd" in json.loads(result["METRICS"])["models"]
    log = "\n".join(feedback.debug)
    assert "stage teacher_a already finished, skipped" in log, log[-3000:]
    with pytest.raises(QgsProcessingException, match="is not a Road SSLKD run folder .no config.json."):
        processing.run("road_sslkd:resume_training", {"RUN_FOLDER": str(tmp_path)})
