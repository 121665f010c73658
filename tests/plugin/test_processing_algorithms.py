"""The Processing provider's algorithms: ``processing.run`` in this QGIS, and ``qgis_process`` as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, ogr
from qgis.core import (
    QgsApplication,
    QgsProcessingException,
    QgsProcessingParameterDefinition,
    QgsProject,
    QgsRasterLayer,
)
from segment_data import expected_probability, make_model, make_raster

from conftest import REPO, needs_backend
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
    }


def _read(path) -> np.ndarray:
    dataset = gdal.Open(str(path))
    values = dataset.GetRasterBand(1).ReadAsArray()
    dataset = None
    return values


def test_segment_roads_writes_probability_and_mask(processing, data, tmp_path):
    out, mask = tmp_path / "prob.tif", tmp_path / "mask.tif"
    result = processing.run(
        "road_sslkd:segment_roads",
        {
            "INPUT": str(data["raster"]),
            "MODEL": str(data["model"]),
            "OUTPUT": str(out),
            "MASK": str(mask),
            "THRESHOLD": 0.6,
        },
    )
    assert result["OUTPUT"] == str(out) and result["MASK"] == str(mask)
    values = _read(out)
    expected = expected_probability(data["pixels"][0])
    assert np.abs(values[10:, 10:].astype(int) - expected[10:, 10:]).max() <= 1
    binary = _read(mask)
    assert set(np.unique(binary)) <= {0, 1}
    assert (binary[10:, 10:] == (values[10:, 10:] >= round(0.6 * 255))).all()
    layer = QgsRasterLayer(str(out), "p", "gdal")
    assert layer.crs().authid() == "EPSG:32633" and layer.extent() == QgsRasterLayer(str(data["raster"]), "s").extent()


def test_segment_roads_averages_eight_views_back_in_place(processing, data, tmp_path):
    """TTA: each tile's 8 flips and rotations, each turned back; a per-pixel model must come out unchanged."""
    out = tmp_path / "tta.tif"
    processing.run("road_sslkd:segment_roads",
                   {"INPUT": str(data["raster"]), "MODEL": str(data["model"]), "OUTPUT": str(out), "TTA": True})
    expected = expected_probability(data["pixels"][0])
    assert np.abs(_read(out)[10:, 10:].astype(int) - expected[10:, 10:]).max() <= 1


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


@pytest.mark.parametrize(
    "case, message",
    [
        ("classifier", "is not a segmentation model"),
        ("one_band", "has 1 band, the model needs 3"),
        ("outside", "does not overlap the layer"),
        ("threshold", "threshold must be between 0 and 1"),
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


def test_algorithms_have_help_and_icons(processing):
    registry = QgsApplication.processingRegistry()
    for algorithm_id in ("road_sslkd:segment_roads", "road_sslkd:train", "road_sslkd:evaluate"):
        algorithm = registry.algorithmById(algorithm_id)
        assert algorithm is not None, algorithm_id
        assert len(algorithm.shortHelpString()) > 100 and not algorithm.icon().isNull()
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
    values = _read(out)
    expected = expected_probability(data["pixels"][0])
    assert np.abs(values[10:, 10:].astype(int) - expected[10:, 10:]).max() <= 1
    bad = qgis_process("run", "road_sslkd:segment_roads", "--", f"INPUT={data['one_band']}",
                       f"MODEL={data['model']}", f"OUTPUT={tmp_path / 'bad.tif'}")  # fmt: skip
    assert bad.returncode != 0 and "the layer gray has 1 band" in bad.stdout + bad.stderr
    assert not (tmp_path / "bad.tif").exists()


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


def test_train_runs_the_backend_and_returns_the_student(processing, demo_dir, tmp_path):
    """The tiny preset on the demo scenes: progress reaches the feedback, the student comes back as an output."""
    from qgis.core import QgsProcessingFeedback

    split = json.loads((demo_dir / "split.json").read_text())
    images = [str(demo_dir / pair["image"]) for pair in split["labelled"]]
    labels = [str(demo_dir / pair["mask"]) for pair in split["labelled"]]
    progress = []

    feedback = QgsProcessingFeedback()
    feedback.progressChanged.connect(progress.append)
    run_dir = tmp_path / "run"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"val_every": 2}))
    result = processing.run(
        "road_sslkd:train",
        {"LABELLED_IMAGES": images, "LABELS": labels, "UNLABELLED": [str(demo_dir / p) for p in split["unlabelled"]],
         "PRESET": 0, "STEPS_SCALE": 0.3, "SEED": 7, "BANDS": "1,2,3", "DEVICE": 1, "CONFIG": str(settings),
         "OUTPUT_FOLDER": str(run_dir)},
        feedback=feedback,
    )  # fmt: skip
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert (config["seed"], config["bands"], config["val_every"]) == (7, [1, 2, 3], 2)  # the advanced parameters
    assert Path(result["MODEL"]).is_file() and result["MODEL"].endswith(".onnx")
    assert Path(result["REPORT"]).is_file()
    assert "student_sslkd" in json.loads(result["METRICS"]).get("models", json.loads(result["METRICS"]))
    assert progress and max(progress) > 50

    # road_sslkd:evaluate on the same run, with the test pair given as layers.
    test = split["test"][0]
    evaluated = processing.run(
        "road_sslkd:evaluate",
        {"RUN": str(run_dir), "TEST_IMAGES": [str(demo_dir / test["image"])],
         "TEST_MASKS": [str(demo_dir / test["mask"])], "MODELS": "student_sslkd"},
    )  # fmt: skip
    metrics = json.loads(evaluated["METRICS"])
    assert set(metrics) == {"student_sslkd"} and 0.0 <= metrics["student_sslkd"]["iou"] <= 1.0
    with pytest.raises(QgsProcessingException, match="not a Road SSLKD run folder"):
        processing.run("road_sslkd:evaluate", {"RUN": str(tmp_path)})
