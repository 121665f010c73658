"""Which layers are offered and how, the checks before Start, and exports of layers without a file."""

import os

import pytest
from osgeo import gdal, ogr, osr
from qgis.core import QgsFeature, QgsGeometry, QgsRasterLayer, QgsVectorLayer

from road_sslkd_plugin.core.layers import (
    Pair,
    RunPlan,
    check_plan,
    describe,
    free_run_name,
    image_layers,
    to_request,
    writable_folder_problem,
)

XYZ = "type=xyz&url=http://127.0.0.1:9/%7Bz%7D/%7Bx%7D/%7By%7D.png&zmax=19&zmin=0"


def write_raster(path, epsg=32633, x0=500000.0, y0=5000000.0, size=32, bands=3):
    driver = gdal.GetDriverByName("GTiff")
    dataset = driver.Create(str(path), size, size, bands, gdal.GDT_Byte)
    dataset.SetGeoTransform((x0, 1.0, 0.0, y0, 0.0, -1.0))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    dataset.SetProjection(srs.ExportToWkt())
    for band in range(bands):
        dataset.GetRasterBand(band + 1).Fill(40 * band + 10)
    dataset = None
    return str(path)


def line_layer(name="roads", crs="EPSG:32633", wkt="LINESTRING(500002 4999990, 500030 4999975)"):
    layer = QgsVectorLayer(f"LineString?crs={crs}", name, "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromWkt(wkt))
    layer.dataProvider().addFeatures([feature])
    layer.updateExtents()
    return layer


@pytest.fixture
def scene(tmp_path, project):
    """Image, mask, a point layer, a web layer and an in-memory raster in one project."""
    image = QgsRasterLayer(write_raster(tmp_path / "image.tif"), "image", "gdal")
    mask = QgsRasterLayer(write_raster(tmp_path / "mask.tif", bands=1), "mask", "gdal")
    points = QgsVectorLayer("Point?crs=EPSG:32633", "trees", "memory")
    web = QgsRasterLayer(XYZ, "OpenStreetMap", "wms")
    write_raster("/vsimem/in_memory.tif")
    in_memory = QgsRasterLayer("/vsimem/in_memory.tif", "in memory", "gdal")
    roads = line_layer()
    layers = dict(image=image, mask=mask, points=points, web=web, in_memory=in_memory, roads=roads)
    for name, layer in layers.items():
        assert layer.isValid(), name
    project.addMapLayers(list(layers.values()))
    yield layers
    gdal.Unlink("/vsimem/in_memory.tif")


def test_layers_are_offered_with_how_they_reach_the_backend(scene, tmp_path):
    image = describe(scene["image"])
    assert image.usable and image.path == str(tmp_path / "image.tif") and not image.export
    web = describe(scene["web"])
    assert web.usable and web.export == "web" and "visible map extent" in web.note()
    memory = describe(scene["in_memory"])
    assert memory.usable and memory.export == "raster" and "GeoTIFF" in memory.note()
    points = describe(scene["points"])
    assert not points.usable and "lines or polygons" in points.reason
    roads = describe(scene["roads"])
    assert roads.usable and roads.export == "vector"

    assert [layer.name() for layer in image_layers()] == ["image", "mask", "OpenStreetMap", "in memory"]


def test_file_vector_is_used_directly_unless_filtered(tmp_path, project):
    memory = line_layer()
    path = str(tmp_path / "roads.gpkg")
    from qgis.core import QgsProject, QgsVectorFileWriter

    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    QgsVectorFileWriter.writeAsVectorFormatV3(memory, path, QgsProject.instance().transformContext(), options)
    layer = QgsVectorLayer(path, "roads file", "ogr")
    assert describe(layer).path == path
    layer.setSubsetString("fid > 100")
    assert describe(layer).export == "vector"
    # A file of two layers: the backend reads only the first, so a layer picked by name is exported.
    two = str(tmp_path / "two.gpkg")
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    source = ogr.GetDriverByName("GPKG").CreateDataSource(two)
    for name in ("old", "new"):
        source.CreateLayer(name, srs, ogr.wkbLineString)
    source = None
    assert describe(QgsVectorLayer(f"{two}|layername=new", "new roads", "ogr")).export == "vector"


def plan_for(tmp_path, pairs, **kwargs):
    return RunPlan(labelled=pairs, output_folder=str(tmp_path / "runs"), run_name="run-1", **kwargs)


def test_a_good_plan_has_no_problems(scene, tmp_path):
    plan = plan_for(tmp_path, [Pair(scene["image"], scene["mask"])], unlabelled=[scene["in_memory"]])
    assert check_plan(plan) == []


def test_no_labelled_pair(scene, tmp_path):
    assert "Add at least one labelled pair" in check_plan(plan_for(tmp_path, [Pair()]))[0]
    problems = check_plan(plan_for(tmp_path, [Pair(scene["image"], None)]))
    assert problems == ["Labelled pair 1: choose a label layer."]


def test_label_in_another_crs(scene, tmp_path):
    mask_4326 = QgsRasterLayer(write_raster(tmp_path / "m4326.tif", epsg=4326, x0=15.0, y0=45.0, bands=1), "m", "gdal")
    problems = check_plan(plan_for(tmp_path, [Pair(scene["image"], mask_4326)]))
    assert len(problems) == 1
    assert "EPSG:4326" in problems[0] and "EPSG:32633" in problems[0] and "reproject" in problems[0]


def test_label_not_overlapping_its_image(scene, tmp_path):
    far = QgsRasterLayer(write_raster(tmp_path / "far.tif", x0=600000.0, bands=1), "far mask", "gdal")
    problems = check_plan(plan_for(tmp_path, [Pair(scene["image"], far)]))
    assert problems == ["Labelled pair 1: labels 'far mask' do not overlap image 'image'."]


def test_image_without_a_file(scene, tmp_path):
    gone = tmp_path / "gone.tif"
    write_raster(gone)
    layer = QgsRasterLayer(str(tmp_path / "never_there.tif"), "lost image", "gdal")
    problems = check_plan(plan_for(tmp_path, [Pair(layer, scene["mask"])]))
    assert "image 'lost image' cannot be used" in problems[0]


def test_vector_labels_need_a_width(scene, tmp_path):
    plan = plan_for(tmp_path, [Pair(scene["image"], scene["roads"])], label_width=0.0)
    assert check_plan(plan) == ["Labelled pair 1: set the road width for vector labels."]
    plan.label_width = 6.0
    assert check_plan(plan) == []


def test_unwritable_output_folder(scene, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    plan = plan_for(tmp_path, [Pair(scene["image"], scene["mask"])])
    plan.output_folder = str(blocker / "runs")
    problems = check_plan(plan)
    assert problems and "cannot be created" in problems[0]
    assert writable_folder_problem(str(tmp_path / "new" / "deeper")) == ""


def test_run_folder_holding_another_run_is_never_reused(scene, tmp_path):
    run = tmp_path / "runs" / "run-1"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    problems = check_plan(plan_for(tmp_path, [Pair(scene["image"], scene["mask"])]))
    assert len(problems) == 1 and "already holds files" in problems[0] and "Nothing is overwritten" in problems[0]
    assert free_run_name(str(tmp_path / "runs"), "run-1") == "run-1-2"
    assert (run / "config.json").read_text() == "{}"


def test_request_exports_layers_without_files(scene, tmp_path):
    plan = plan_for(
        tmp_path,
        [Pair(scene["in_memory"], scene["roads"])],
        unlabelled=[scene["image"], scene["in_memory"]],
        label_width=5.0,
    )
    assert check_plan(plan) == []
    inputs = tmp_path / "runs" / "run-1.inputs"
    request = to_request(plan, str(inputs))
    ((image, label),) = request.labelled
    assert image.endswith(".tif") and os.path.isfile(image) and image.startswith(str(inputs))
    assert label.endswith(".gpkg") and os.path.isfile(label)
    exported = QgsRasterLayer(image, "check", "gdal")
    assert exported.isValid() and exported.width() == 32 and exported.crs().authid() == "EPSG:32633"
    assert QgsVectorLayer(label, "check", "ogr").featureCount() == 1
    # the paired in-memory image is not unlabelled too; the file image is passed as it is
    assert request.unlabelled == [str(tmp_path / "image.tif")]
    assert request.label_width == 5.0
    assert not (tmp_path / "runs" / "run-1").exists(), "the run folder itself is the backend's to create"


def test_web_layer_export_needs_the_map_view(scene, tmp_path):
    plan = plan_for(tmp_path, [Pair(scene["web"], scene["mask"])])
    with pytest.raises(RuntimeError, match="web layer"):
        to_request(plan, str(tmp_path / "inputs"))


def test_images_need_the_bands_training_reads(scene, tmp_path):
    plan = plan_for(tmp_path, [Pair(scene["image"], scene["mask"])], unlabelled=[scene["mask"]])
    problems = check_plan(plan)
    assert problems == [
        "Unlabelled image 'mask' has 1 band(s); training reads bands 1,2,3 unless Bands says otherwise: untick "
        "it, or choose the bands to use (Training, Advanced, Bands)."
    ]
    plan.bands = "1"
    assert check_plan(plan) == []
    plan.bands = "1,2,3"
    assert check_plan(plan) == ["Unlabelled image 'mask' has 1 band(s); Bands asks for band 3."]
    plan.bands = "red"
    assert check_plan(plan) == ["Bands 'red' must be band numbers like 1,2,3."]
