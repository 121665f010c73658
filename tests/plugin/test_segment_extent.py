"""The "Segment visible extent" action: real QGIS and onnxruntime, a pointwise ONNX model with known output."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal
from qgis.core import (
    Qgis,
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from segment_data import ORIGIN, expected_probability, make_model, make_raster

import road_sslkd_plugin
from conftest import needs_backend, wait_until
from road_sslkd_plugin.compat import qgis_enum
from road_sslkd_plugin.core import cli, segment, settings
from road_sslkd_plugin.core.backend import BackendLocator
from road_sslkd_plugin.ui.segment_extent import (
    FOLDER_KEY,
    GROUP,
    KEEP_KEY,
    LINES_KEY,
    ExtentSegmenter,
    default_layer,
    output_folder,
)

pytestmark = needs_backend  # the test model is written with the backend venv's onnx package
TIF_GPKG = (".tif", ".gpkg")  # a result and its centrelines
LINE = qgis_enum("Qgis.GeometryType.Line", "QgsWkbTypes.GeometryType.LineGeometry")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("segment")
    return {
        "raster": folder / "scene.tif",
        "pixels": make_raster(folder / "scene.tif"),
        "model": make_model(folder / "pointwise.onnx"),
        "model_1m": make_model(folder / "pointwise_1m.onnx", resolution_cm=100.0),
        "model_5m": make_model(folder / "pointwise_5m.onnx", resolution_cm=500.0),  # 10x the scene's pixels
        # Trained on bands 3,2,1 of 16-bit imagery: band 3 is read, and the 8-bit scene gets a warning.
        "bgr16": make_model(
            folder / "bgr16.onnx", resolution_cm=50.0, training={"bands": [3, 2, 1], "dtype": "uint16"}
        ),
        "folder": folder,
    }


@pytest.fixture(scope="module")
def data_lines(data):
    """``data`` with a model whose road threshold is 0.7 (the others have 0.5)."""
    return {**data, "thresh07": make_model(data["folder"] / "thresh07.onnx", threshold=0.7)}


@pytest.fixture
def scene(project, data, tmp_path, qgis_iface):
    layer = QgsRasterLayer(str(data["raster"]), "scene", "gdal")
    assert layer.isValid()
    project.addMapLayer(layer)
    settings.set_user_value("segment/output_folder", str(tmp_path / "out"))
    qgis_iface.setActiveLayer(layer)
    return layer


def _show(canvas, extent: QgsRectangle, crs: str = "EPSG:32633") -> QgsRectangle:
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem(crs))
    canvas.setExtent(extent)
    canvas.refresh()
    return canvas.mapSettings().visibleExtent()


def _run(segmenter: ExtentSegmenter, **kwargs) -> tuple:
    results = []
    segmenter.finished.connect(lambda layer, text: results.append((layer, text)))
    assert segmenter.run(**kwargs)
    assert wait_until(lambda: results, 60)
    return results[0]


def _run_with_lines(segmenter: ExtentSegmenter, **kwargs) -> tuple:
    """``_run`` with "Draw Road Centrelines" on: (result, its message, centrelines layer or None, their message)."""
    settings.set_user_value(LINES_KEY, "true")
    drawn = []
    segmenter.centrelines_finished.connect(lambda layer, text: drawn.append((layer, text)))
    result, text = _run(segmenter, **kwargs)
    assert result is not None, text
    assert wait_until(lambda: drawn, 120)
    return result, text, *drawn[0]


def _segment_file(qgis_iface, project, path: Path, model: str) -> tuple[np.ndarray, np.ndarray]:
    """Add the raster ``path`` as a layer, segment all of it, and read the result's values and mask."""
    layer = QgsRasterLayer(str(path), path.stem, "gdal")
    project.addMapLayer(layer)
    settings.set_user_value(FOLDER_KEY, str(path.parent / "out"))
    _show(qgis_iface.mapCanvas(), layer.extent())
    result, text = _run(ExtentSegmenter(qgis_iface), layer=layer, model_path=model)
    assert result is not None, text
    dataset = gdal.Open(result.source())
    values, mask = dataset.GetRasterBand(1).ReadAsArray(), dataset.GetRasterBand(1).GetMaskBand().ReadAsArray()
    dataset = None
    return values, mask


def _read(path: str) -> tuple[np.ndarray, tuple]:
    dataset = gdal.Open(path)
    values, transform = dataset.GetRasterBand(1).ReadAsArray(), dataset.GetGeoTransform()
    dataset = None
    return values, transform


def test_segments_the_visible_part_of_the_layer_exactly(qgis_iface, scene, data):
    visible = _show(qgis_iface.mapCanvas(), QgsRectangle(500_010.0, 4_999_960.0, 500_030.0, 4_999_990.0))
    segmenter = ExtentSegmenter(qgis_iface)
    layer, text = _run(segmenter, model_path=str(data["model"]))
    assert isinstance(layer, QgsRasterLayer) and layer.isValid(), text
    assert layer.crs().authid() == "EPSG:32633"
    # The result covers the visible extent snapped outwards to the layer's 0.5 m grid, inside the layer.
    expected = visible.intersect(scene.extent())
    assert layer.extent().contains(expected)
    assert layer.extent().width() - expected.width() < 1.0 + 1e-6
    values, transform = _read(layer.source())
    assert transform[1] == pytest.approx(0.5) and transform[5] == pytest.approx(-0.5)
    col0 = round((transform[0] - ORIGIN[0]) / 0.5)
    row0 = round((ORIGIN[1] - transform[3]) / 0.5)
    source = data["pixels"][0][row0 : row0 + values.shape[0], col0 : col0 + values.shape[1]]
    assert np.abs(values.astype(int) - expected_probability(source)).max() <= 1
    assert values.max() > 200 and values.min() < 60  # the bright road and the dark ground
    # In the "Road SSLKD" group, styled with the probability ramp.
    group = QgsProject.instance().layerTreeRoot().findGroup(GROUP)
    assert group is not None and group.findLayer(layer.id()) is not None
    assert layer.renderer().type() == "singlebandpseudocolor"
    assert "Roads segmented" in text


def test_without_onnxruntime_in_qgis_the_backend_cli_segments(qgis_iface, scene, data, monkeypatch):
    """Most QGIS installs have no onnxruntime: the task then runs `road-sslkd predict` from the backend venv."""
    monkeypatch.setattr(segment, "engine_available", lambda: False)  # our switch, not onnxruntime itself
    visible = _show(qgis_iface.mapCanvas(), QgsRectangle(500_010.0, 4_999_960.0, 500_030.0, 4_999_990.0))
    layer, text = _run(ExtentSegmenter(qgis_iface), model_path=str(data["model"]))
    assert layer is not None and layer.isValid(), text
    assert layer.extent().contains(visible.intersect(scene.extent()))
    values, transform = _read(layer.source())
    col0 = round((transform[0] - ORIGIN[0]) / 0.5)
    row0 = round((ORIGIN[1] - transform[3]) / 0.5)
    source = data["pixels"][0][row0 : row0 + values.shape[0], col0 : col0 + values.shape[1]]
    assert np.abs(values.astype(int) - expected_probability(source)).max() <= 1


def test_reprojects_the_canvas_extent_and_resamples_to_the_model_resolution(qgis_iface, scene, data):
    # A geographic canvas showing the whole scene; the model asks for 1 m pixels (the scene has 0.5 m).
    _show(qgis_iface.mapCanvas(), QgsRectangle(14.9, 45.0, 15.1, 45.2), "EPSG:4326")
    layer, text = _run(ExtentSegmenter(qgis_iface), model_path=str(data["model_1m"]))
    assert layer is not None, text
    assert layer.crs().authid() == "EPSG:32633"
    values, transform = _read(layer.source())
    assert transform[1] == pytest.approx(1.0)
    assert values.shape == (50, 60)  # the whole 60 m x 50 m scene at 1 m
    assert layer.extent().toString(1) == scene.extent().toString(1)


def test_nodata_stays_masked(qgis_iface, scene, data):
    _show(qgis_iface.mapCanvas(), scene.extent())
    layer, _ = _run(ExtentSegmenter(qgis_iface), model_path=str(data["model"]))
    dataset = gdal.Open(layer.source())
    mask = dataset.GetRasterBand(1).GetMaskBand().ReadAsArray()
    values = dataset.GetRasterBand(1).ReadAsArray()
    dataset = None
    assert (mask[:10, :10] == 0).all() and (mask[10:, 10:] == 255).all()
    assert (values[:10, :10] == 0).all()


def test_repeated_runs_replace_the_result_unless_kept(qgis_iface, scene, data):
    _show(qgis_iface.mapCanvas(), scene.extent())
    segmenter = ExtentSegmenter(qgis_iface)
    first, _ = _run(segmenter, model_path=str(data["model"]))
    first_id, first_file = first.id(), Path(first.source())
    second, _ = _run(ExtentSegmenter(qgis_iface), model_path=str(data["model"]))
    project = QgsProject.instance()
    assert project.mapLayer(first_id) is None and project.mapLayer(second.id()) is not None
    assert not first_file.exists()  # a replaced result leaves no file behind
    settings.set_user_value(KEEP_KEY, "true")
    third, _ = _run(ExtentSegmenter(qgis_iface), model_path=str(data["model"]))
    assert project.mapLayer(second.id()) is not None and project.mapLayer(third.id()) is not None
    assert Path(second.source()).exists() and Path(third.source()).exists()
    group = project.layerTreeRoot().findGroup(GROUP)
    assert [node.layerId() for node in group.findLayers()][:2] == [third.id(), second.id()]  # newest on top
    # Results are never picked as the layer to segment.
    qgis_iface.setActiveLayer(third)
    assert default_layer(project, third) is scene


def test_results_of_an_unsaved_project_go_to_a_lasting_folder(project, tmp_path):
    settings.set_user_value(FOLDER_KEY, "")
    assert output_folder(project) == str(Path.home() / "road_sslkd_segmentations")  # not the temp folder
    assert project.write(str(tmp_path / "p.qgz"))
    assert output_folder(project) == str(tmp_path / "road_sslkd_segmentations")
    settings.set_user_value(FOLDER_KEY, str(tmp_path / "mine"))
    assert output_folder(project) == str(tmp_path / "mine")


def test_clear_messages_when_it_cannot_run(qgis_iface, scene, data, tmp_path):
    canvas = qgis_iface.mapCanvas()
    _show(canvas, QgsRectangle(600_000, 5_100_000, 600_100, 5_100_100))  # far away from the scene
    segmenter = ExtentSegmenter(qgis_iface)
    texts = []
    segmenter.finished.connect(lambda layer, text: texts.append(text))
    assert not segmenter.run(model_path=str(data["model"]))
    assert "does not overlap the layer scene" in texts[-1]
    _show(canvas, scene.extent())
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    assert not segmenter.run(model_path=str(broken))
    assert "not a usable ONNX model" in texts[-1]
    with pytest.raises(segment.SegmentError, match="has 3 bands, the model needs 4"):
        segment.check_bands(scene, 4)


def test_reads_the_training_bands_and_warns_about_another_data_type(qgis_iface, scene, data):
    _show(qgis_iface.mapCanvas(), scene.extent())
    bar = qgis_iface.messageBar()
    bar.clear_messages()
    layer, text = _run(ExtentSegmenter(qgis_iface), model_path=str(data["bgr16"]))
    assert layer is not None and layer.isValid(), text
    values, transform = _read(layer.source())
    col0, row0 = round((transform[0] - ORIGIN[0]) / 0.5), round((ORIGIN[1] - transform[3]) / 0.5)
    source = data["pixels"][2][row0 : row0 + values.shape[0], col0 : col0 + values.shape[1]]
    off = np.abs(values.astype(int) - expected_probability(source))
    assert off[10:, 10:].max() <= 1  # away from the nodata corner
    warnings = bar.get_messages(Qgis.MessageLevel.Warning)
    assert any("is uint8 but the model was trained on uint16 imagery" in w for w in warnings), warnings


def test_toolbar_action_and_dock_button(qgis_iface, scene, data):
    """The plugin's action (toolbar, menu, Ctrl+Alt+R) runs with the model chosen with "Use this model"."""
    settings.set_selected_model(str(data["model"]))
    _show(qgis_iface.mapCanvas(), scene.extent())
    plugin = road_sslkd_plugin.classFactory(qgis_iface)
    plugin.initGui()
    try:
        assert plugin.segment_action.shortcut().toString() == "Ctrl+Alt+R"
        plugin.keep_action.setChecked(True)  # the menu's "Keep Earlier Segmentations" is the setting
        assert settings.user_value(KEEP_KEY) == "true"
        plugin.keep_action.setChecked(False)
        plugin.show_dock(True)
        assert plugin.dock.segment_button.defaultAction() is plugin.segment_action
        results = []
        plugin.segment_action.trigger()
        plugin.segmenter.finished.connect(lambda layer, text: results.append(layer))
        assert wait_until(lambda: results, 60)
        assert results[0] is not None and results[0].isValid()
    finally:
        plugin.unload()


def test_only_the_onnx_engine_of_the_backend_is_imported(qgis_iface, scene, data):
    """In-process segmentation loads road_sslkd's numpy + onnxruntime modules, never torch or training code."""
    import sys

    _show(qgis_iface.mapCanvas(), scene.extent())
    layer, text = _run(ExtentSegmenter(qgis_iface), model_path=str(data["model"]))
    assert layer is not None, text
    loaded = {name for name in sys.modules if name == "road_sslkd" or name.startswith("road_sslkd.")}
    assert loaded <= {"road_sslkd", "road_sslkd.onnx_runtime", "road_sslkd.engine", "road_sslkd.events"}
    assert "torch" not in sys.modules and "rasterio" not in sys.modules


@pytest.mark.parametrize(
    ("transparency", "in_process"),
    [("alpha", True), ("mask", True), ("alpha", False)],
    ids=["alpha", "mask", "alpha-backend"],
)
def test_transparent_pixels_stay_masked(qgis_iface, project, data, tmp_path, monkeypatch, transparency, in_process):
    """Alpha 0 (an alpha band, or GDAL's mask inside the file) is no imagery: masked in the result, not segmented."""
    if not in_process:
        monkeypatch.setattr(segment, "engine_available", lambda: False)
    pixels = make_raster(tmp_path / "rgba.tif", nodata_corner=False, transparency=transparency)
    values, mask = _segment_file(qgis_iface, project, tmp_path / "rgba.tif", str(data["model"]))
    assert (mask[:, :10] == 0).all() and (mask[:, 10:] == 255).all()
    assert np.abs(values[:, 10:].astype(int) - expected_probability(pixels[0][:, 10:])).max() <= 1


def test_geographic_layer_under_a_web_mercator_canvas_keeps_its_grid(qgis_iface, project, data, tmp_path):
    """The result lies on the layer's own CRS and pixel grid (checked with GDAL), whatever the canvas CRS."""
    pixel = 1e-5  # degrees, about 0.8 m x 1.1 m at 45 N: read as it is (no model resolution)
    make_raster(tmp_path / "geo.tif", pixel=pixel, epsg=4326, origin=(15.0, 45.0))
    layer = QgsRasterLayer(str(tmp_path / "geo.tif"), "geo", "gdal")
    project.addMapLayer(layer)
    settings.set_user_value(FOLDER_KEY, str(tmp_path / "out"))
    mercator = QgsCoordinateReferenceSystem("EPSG:3857")
    centre = QgsCoordinateTransform(layer.crs(), mercator, project).transform(layer.extent().center())
    x, y = centre.x(), centre.y()
    visible = _show(qgis_iface.mapCanvas(), QgsRectangle(x - 10, y - 10, x + 10, y + 10), "EPSG:3857")
    result, text = _run(ExtentSegmenter(qgis_iface), layer=layer, model_path=str(data["model"]))
    assert result is not None, text
    dataset = gdal.Open(result.source())
    transform, wkt = dataset.GetGeoTransform(), dataset.GetProjection()
    dataset = None
    assert QgsCoordinateReferenceSystem.fromWkt(wkt).authid() == "EPSG:4326"
    assert transform[1] == pytest.approx(pixel) and transform[5] == pytest.approx(-pixel)
    col0, row0 = (transform[0] - 15.0) / pixel, (45.0 - transform[3]) / pixel
    assert col0 == pytest.approx(round(col0), abs=1e-6) and row0 == pytest.approx(round(row0), abs=1e-6)
    to_layer = QgsCoordinateTransform(mercator, layer.crs(), project)
    assert result.extent().contains(to_layer.transformBoundingBox(visible).intersect(layer.extent()))
    assert 0 < round(col0) < 120 and 0 < round(row0) < 100  # the visible part, not the whole layer


@pytest.mark.parametrize("engine", ["in QGIS", "backend"])
@pytest.mark.parametrize("model, said", [
    ("bgr16", "the layer scene is uint8 but the model was trained on uint16"),
    ("model_5m", "has 0.50 m pixels but the model was trained at 5.00 m: it is resampled 0.1x per side"),
])
def test_warnings_reach_the_message_bar_on_either_path(qgis_iface, scene, data, monkeypatch, engine, model, said):
    """Another data type or a far resolution (a 5 m model on 0.5 m imagery): the warnings `road-sslkd predict`
    gives, from QGIS's own engine or from the backend's task thread."""
    if engine == "backend":
        monkeypatch.setattr(segment, "engine_available", lambda: False)
    _show(qgis_iface.mapCanvas(), scene.extent())
    bar = qgis_iface.messageBar()
    bar.clear_messages()
    layer, text = _run(ExtentSegmenter(qgis_iface), model_path=str(data[model]))
    assert layer is not None, text
    warnings = bar.get_messages(Qgis.MessageLevel.Warning)
    assert any(said in w for w in warnings), warnings


def test_a_failed_backend_run_leaves_no_scratch_folder(qgis_iface, scene, data, monkeypatch, tmp_path):
    monkeypatch.setattr(segment, "engine_available", lambda: False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    (tmp_path / "file").write_text("not a folder")
    settings.set_user_value(FOLDER_KEY, str(tmp_path / "file" / "out"))  # unwritable: the result cannot be placed
    _show(qgis_iface.mapCanvas(), scene.extent())
    layer, text = _run(ExtentSegmenter(qgis_iface), model_path=str(data["model"]))
    assert layer is None and "Cannot write the result" in text
    assert list((tmp_path / "temp").iterdir()) == []


def test_a_web_layer_is_named_with_how_to_segment_it(qgis_iface, project, data):
    xyz = QgsRasterLayer("type=xyz&url=file:///nowhere/{z}/{x}/{y}.png&zmax=19&zmin=0", "Satellite", "wms")
    assert xyz.isValid()
    project.addMapLayer(xyz)
    qgis_iface.setActiveLayer(xyz)
    segmenter = ExtentSegmenter(qgis_iface)
    texts = []
    segmenter.finished.connect(lambda layer, text: texts.append(text))
    assert not segmenter.run(model_path=str(data["model"]))
    assert "The layer Satellite is a web or image-only layer" in texts[-1] and "Export > Save As" in texts[-1]


def test_an_extent_that_cannot_be_transformed_says_what_to_do(project, tmp_path):
    make_raster(tmp_path / "geo.tif", pixel=1e-5, epsg=4326, origin=(15.0, 45.0))
    layer = QgsRasterLayer(str(tmp_path / "geo.tif"), "geo", "gdal")
    project.addMapLayer(layer)  # the project owns it: a layer left to Python's exit outlives QGIS and crashes it
    far = QgsRectangle(1e8, 1e8, 2e8, 2e8)  # no point of it lies on the Earth
    with pytest.raises(segment.SegmentError, match="to the CRS of the layer geo") as error:
        segment.plan_window(layer, far, QgsCoordinateReferenceSystem("EPSG:32633"))
    assert "zoom in to the layer" in error.value.hint


def test_a_fourth_band_is_imagery_not_alpha_for_the_backend(qgis_iface, project, data, tmp_path, monkeypatch):
    """RGB + near infrared: the window copied for `road-sslkd predict` must not turn band 4 into alpha."""
    monkeypatch.setattr(segment, "engine_available", lambda: False)
    pixels = make_raster(tmp_path / "rgbn.tif", bands=4, nodata_corner=False)
    dataset = gdal.Open(str(tmp_path / "rgbn.tif"), gdal.GA_Update)
    dataset.GetRasterBand(4).WriteArray(np.zeros((100, 10), np.uint8))  # no infrared light (water, shadow)
    dataset = None
    values, mask = _segment_file(qgis_iface, project, tmp_path / "rgbn.tif", str(data["model"]))
    assert (mask == 255).all()
    assert np.abs(values.astype(int) - expected_probability(pixels[0])).max() <= 1


def test_a_result_finished_after_another_project_opened_stays_out_of_it(qgis_iface, scene, data, tmp_path):
    """The project is cleared while the task runs: the GeoTIFF is written where the run's project put it,
    and no layer is added to (or replaced in) the project now open."""
    _show(qgis_iface.mapCanvas(), scene.extent())
    segmenter = ExtentSegmenter(qgis_iface)
    results = []
    segmenter.finished.connect(lambda layer, text: results.append((layer, text)))
    assert segmenter.run(model_path=str(data["model"]))
    QgsProject.instance().clear()  # before the task's end reaches the main thread: no event was processed
    assert wait_until(lambda: results, 60)
    layer, text = results[0]
    assert layer is None and "another project was opened meanwhile" in text, text
    written = list((tmp_path / "out").glob("roads_scene_*.tif"))
    assert len(written) == 1 and str(written[0]) in text
    assert not QgsProject.instance().mapLayers()


# ------------------------------------------------------------------------------------- road centrelines
@pytest.mark.parametrize("in_process", [True, False], ids=["in QGIS", "backend"])
def test_centrelines_are_drawn_above_the_result(qgis_iface, scene, data_lines, monkeypatch, in_process):
    """The backend vectorises the result at the threshold it was made for, the model's (0.7), on both paths (on
    the backend's, ``road-sslkd predict`` reads it from the model and says it)."""
    if not in_process:
        monkeypatch.setattr(segment, "engine_available", lambda: False)
    _show(qgis_iface.mapCanvas(), scene.extent())
    segmenter = ExtentSegmenter(qgis_iface)
    result, _, lines, text = _run_with_lines(segmenter, model_path=str(data_lines["thresh07"]))
    assert isinstance(lines, QgsVectorLayer) and lines.isValid(), text
    assert "(threshold 0.7)" in text
    assert lines.name() == "Centrelines — scene" and lines.geometryType() == LINE
    assert lines.crs().authid() == result.crs().authid() == "EPSG:32633"
    assert Path(lines.source().split("|")[0]) == Path(result.source()).with_suffix(".gpkg")
    features = list(lines.getFeatures())
    assert features and all(result.extent().contains(f.geometry().boundingBox()) for f in features)
    assert all(0 < f["length_m"] == pytest.approx(f.geometry().length(), rel=0.01) for f in features)
    assert sum(f["length_m"] for f in features) > 50  # the scene's 78 m diagonal road, less its ends
    assert lines.renderer().symbol().symbolLayerCount() == 2  # road_centrelines.qml: a haloed line
    group = QgsProject.instance().layerTreeRoot().findGroup(GROUP)
    assert [node.layerId() for node in group.findLayers()][:2] == [lines.id(), result.id()]  # just above it
    assert not segmenter.is_running()


def test_centrelines_are_replaced_with_their_result_unless_kept(qgis_iface, scene, data):
    _show(qgis_iface.mapCanvas(), scene.extent())
    project = QgsProject.instance()
    model = str(data["model"])
    first, _, first_lines, text = _run_with_lines(ExtentSegmenter(qgis_iface), model_path=model)
    assert first_lines is not None, text
    first_ids, first_files = [first.id(), first_lines.id()], [Path(first.source()).with_suffix(s) for s in TIF_GPKG]
    second, _, second_lines, _ = _run_with_lines(ExtentSegmenter(qgis_iface), model_path=model)
    assert not any(project.mapLayer(layer_id) for layer_id in first_ids)
    assert not any(path.exists() for path in first_files)  # a replaced result leaves no file behind
    settings.set_user_value(KEEP_KEY, "true")
    third, _, third_lines, _ = _run_with_lines(ExtentSegmenter(qgis_iface), model_path=model)
    third_files = [Path(third.source()).with_suffix(s) for s in TIF_GPKG]
    group = project.layerTreeRoot().findGroup(GROUP)
    kept = [third_lines.id(), third.id(), second_lines.id(), second.id()]
    assert [node.layerId() for node in group.findLayers()] == kept
    assert all(Path(layer.source().split("|")[0]).exists() for layer in (second, second_lines, third, third_lines))
    # Setting off: the next result replaces the last one with its centrelines, and gets none itself.
    settings.set_user_value(KEEP_KEY, "false")
    settings.set_user_value(LINES_KEY, "false")
    segmenter = ExtentSegmenter(qgis_iface)
    drawn = []
    segmenter.centrelines_finished.connect(lambda layer, text: drawn.append(layer))
    fourth, _ = _run(segmenter, model_path=model)
    assert not segmenter.is_running() and not drawn
    assert [node.layerId() for node in group.findLayers()] == [fourth.id(), second_lines.id(), second.id()]
    assert not Path(fourth.source()).with_suffix(".gpkg").exists()
    assert not any(path.exists() for path in third_files)


def test_without_a_backend_the_result_is_added_and_the_centrelines_are_explained(
    qgis_iface, scene, data, monkeypatch, tmp_path
):
    """onnxruntime in QGIS but no backend anywhere: the probability layer lands, and a warning says why no lines."""
    nowhere = BackendLocator(plugin_dir=tmp_path / "plugin" / "road_sslkd_plugin", profile_venv=tmp_path / "venv",
                             use_setting=False)
    monkeypatch.setattr(cli, "BackendLocator", lambda: nowhere)  # a real search, in empty places
    _show(qgis_iface.mapCanvas(), scene.extent())
    bar = qgis_iface.messageBar()
    bar.clear_messages()
    result, _, lines, text = _run_with_lines(ExtentSegmenter(qgis_iface), model_path=str(data["model"]))
    assert result.isValid() and lines is None
    assert "Centrelines not drawn" in text and "Set up backend" in text
    assert any(text in warning for warning in bar.get_messages(Qgis.MessageLevel.Warning))
    assert [layer.id() for layer in QgsProject.instance().mapLayers().values() if layer.id() != scene.id()] == [
        result.id()
    ]


def test_centrelines_finished_after_another_project_opened_stay_out_of_it(qgis_iface, scene, data, tmp_path):
    _show(qgis_iface.mapCanvas(), scene.extent())
    segmenter = ExtentSegmenter(qgis_iface)
    settings.set_user_value(LINES_KEY, "true")
    drawn = []
    segmenter.centrelines_finished.connect(lambda layer, text: drawn.append((layer, text)))
    result, text = _run(segmenter, model_path=str(data["model"]))
    assert result is not None and segmenter.is_running(), text  # the centrelines task
    QgsProject.instance().clear()  # before the task's end reaches the main thread: no event was processed
    assert wait_until(lambda: drawn, 120)
    lines, text = drawn[0]
    assert lines is None and "another project was opened meanwhile" in text, text
    assert len(list((tmp_path / "out").glob("roads_scene_*.gpkg"))) == 1
    assert not QgsProject.instance().mapLayers()


def test_unload_while_centrelines_are_drawn_adds_nothing(qgis_iface, scene, data):
    settings.set_selected_model(str(data["model"]))
    _show(qgis_iface.mapCanvas(), scene.extent())
    plugin = road_sslkd_plugin.classFactory(qgis_iface)
    plugin.initGui()
    try:
        assert not plugin.lines_action.isChecked()  # off by default
        plugin.lines_action.setChecked(True)  # the menu's "Draw Road Centrelines" is the setting
        assert settings.user_value(LINES_KEY) == "true"
        results, drawn = [], []
        plugin.segment_action.trigger()
        segmenter = plugin.segmenter
        segmenter.finished.connect(lambda layer, text: results.append(layer))
        segmenter.centrelines_finished.connect(lambda layer, text: drawn.append(layer))
        assert wait_until(lambda: results, 60)
        assert results[0] is not None and segmenter.is_running()
    finally:
        plugin.unload()
    assert wait_until(lambda: QgsApplication.taskManager().countActiveTasks() == 0, 60)
    QgsApplication.processEvents()
    assert not drawn
    assert not [layer for layer in QgsProject.instance().mapLayers().values() if isinstance(layer, QgsVectorLayer)]


def test_a_second_run_while_centrelines_are_drawn_says_what_runs(qgis_iface, scene, data):
    """Ctrl+Alt+R again once the probability layer landed: refused, naming the centrelines still being drawn."""
    _show(qgis_iface.mapCanvas(), scene.extent())
    segmenter = ExtentSegmenter(qgis_iface)
    settings.set_user_value(LINES_KEY, "true")
    result, text = _run(segmenter, model_path=str(data["model"]))
    assert result is not None and segmenter.is_running(), text
    bar = qgis_iface.messageBar()
    bar.clear_messages()
    assert not segmenter.run(model_path=str(data["model"]))
    said = bar.get_messages(Qgis.MessageLevel.Info)
    assert any("Still drawing the centrelines of scene" in message for message in said), said
    assert wait_until(lambda: not segmenter.is_running(), 120)


def test_a_result_and_its_centrelines_are_replaced_together_whatever_the_user_did(qgis_iface, scene, data, tmp_path):
    """Renamed, moved out of the group, removed by hand, saved and reopened: with "Keep Earlier Segmentations" off,
    the next result replaces the layers of the last one that remain and deletes all its files."""
    _show(qgis_iface.mapCanvas(), scene.extent())
    project = QgsProject.instance()
    model, scene_id = str(data["model"]), scene.id()
    first, _, first_lines, _ = _run_with_lines(ExtentSegmenter(qgis_iface), model_path=model)
    first_id = first.id()
    first.setName("my roads")
    root = project.layerTreeRoot()
    node = root.findLayer(first_id)
    root.insertChildNode(0, node.clone())
    node.parent().removeChildNode(node)
    project.removeMapLayer(first_lines.id())  # the GeoPackage stays, of the result still shown
    assert project.write(str(tmp_path / "roads.qgz"))
    project.clear()
    assert project.read(str(tmp_path / "roads.qgz"))
    second, _, second_lines, _ = _run_with_lines(ExtentSegmenter(qgis_iface), layer=project.mapLayer(scene_id),
                                                 model_path=model)
    assert project.mapLayer(first_id) is None
    stem = Path(second.source()).stem
    assert {path.stem.split(".")[0] for path in (tmp_path / "out").iterdir()} == {stem}
    project.removeMapLayer(second.id())  # the lines are kept, without their probability layer
    third, _, third_lines, _ = _run_with_lines(ExtentSegmenter(qgis_iface), layer=project.mapLayer(scene_id),
                                               model_path=model)
    assert sorted(project.mapLayers()) == sorted([scene_id, third.id(), third_lines.id()])
    assert {path.stem.split(".")[0] for path in (tmp_path / "out").iterdir()} == {Path(third.source()).stem}


def test_centrelines_with_unsaved_edits_are_not_replaced(qgis_iface, scene, data):
    """The user is fixing the lines when Ctrl+Alt+R comes: their edits (and GeoPackage) stay, with a warning."""
    _show(qgis_iface.mapCanvas(), scene.extent())
    model = str(data["model"])
    first, _, lines, _ = _run_with_lines(ExtentSegmenter(qgis_iface), model_path=model)
    first_file = Path(first.source())
    assert lines.startEditing() and lines.deleteFeature(next(lines.getFeatures()).id())
    bar = qgis_iface.messageBar()
    bar.clear_messages()
    _run_with_lines(ExtentSegmenter(qgis_iface), model_path=model)
    assert QgsProject.instance().mapLayer(lines.id()) is lines and lines.isModified()
    assert first_file.with_suffix(".gpkg").exists() and not first_file.exists()
    warnings = bar.get_messages(Qgis.MessageLevel.Warning)
    assert any("Centrelines — scene has unsaved edits: kept" in warning for warning in warnings), warnings
    assert lines.rollBack()
