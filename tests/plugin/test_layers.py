"""Which layers are offered and how, the checks before Start, and exports of layers without a file."""

import os

import pytest
from osgeo import gdal, ogr, osr
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsGeometry,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorFileWriter,
    QgsVectorLayer,
)

from road_sslkd_plugin.core.layers import (
    Pair,
    RunPlan,
    WebExtent,
    check_plan,
    describe,
    free_run_name,
    image_layers,
    to_request,
    width_units,
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


def line_layer(name="roads", crs="EPSG:32633", wkt="LINESTRING(500002 4999990, 500030 4999975)", fields=""):
    layer = QgsVectorLayer(f"LineString?crs={crs}{fields}", name, "memory")
    feature = QgsFeature(layer.fields())
    feature.setGeometry(QgsGeometry.fromWkt(wkt))
    layer.dataProvider().addFeatures([feature])
    layer.updateExtents()
    return layer


def save_gpkg(layer, path):
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    QgsVectorFileWriter.writeAsVectorFormatV3(layer, str(path), QgsProject.instance().transformContext(), options)
    return str(path)


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
    path = save_gpkg(line_layer(), tmp_path / "roads.gpkg")
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


def test_unsaved_edits_of_file_labels_go_to_training(scene, tmp_path):
    # The saved file holds one road outside the image; the editing session adds one over it.
    far = line_layer(wkt="LINESTRING(600002 4999990, 600030 4999975)")
    layer = QgsVectorLayer(save_gpkg(far, tmp_path / "roads.gpkg"), "roads", "ogr")
    assert describe(layer).path == str(tmp_path / "roads.gpkg")
    layer.startEditing()
    added = QgsFeature(layer.fields())
    added.setGeometry(QgsGeometry.fromWkt("LINESTRING(500002 4999990, 500030 4999975)"))
    assert layer.addFeature(added) and layer.isModified()
    plan = plan_for(tmp_path, [Pair(scene["image"], layer)], label_width=6.0)
    assert describe(layer).export == "vector"
    assert check_plan(plan) == []
    ((_, label),) = to_request(plan, str(tmp_path / "inputs")).labelled
    assert label.startswith(str(tmp_path / "inputs"))
    exported = QgsVectorLayer(label, "check", "ogr")
    assert sorted(f.geometry().boundingBox().xMinimum() for f in exported.getFeatures()) == [500002, 600002]
    layer.rollBack()


def test_vector_labels_in_another_crs_are_checked_where_they_lie(scene, tmp_path):
    # OpenStreetMap roads in EPSG:4326 over a UTM image: the backend reprojects them.
    to_wgs84 = QgsCoordinateTransform(scene["image"].crs(), QgsCoordinateReferenceSystem("EPSG:4326"),
                                      QgsProject.instance())
    road = QgsGeometry.fromWkt("LINESTRING(500002 4999990, 500030 4999975)")
    road.transform(to_wgs84)
    osm = line_layer("osm roads", "EPSG:4326", road.asWkt(9))
    assert check_plan(plan_for(tmp_path, [Pair(scene["image"], osm)], label_width=6.0)) == []
    far = line_layer("far roads", "EPSG:4326", "LINESTRING(16 46, 16.1 46)")
    assert check_plan(plan_for(tmp_path, [Pair(scene["image"], far)], label_width=6.0)) == [
        "Labelled pair 1: labels 'far roads' do not overlap image 'image'."
    ]


def test_road_width_is_in_the_units_the_backend_buffers_in(scene, tmp_path):
    osm = line_layer("osm roads", "EPSG:4326", "LINESTRING(15 45.1, 15.001 45.1)")
    assert width_units(plan_for(tmp_path, [Pair(scene["image"], osm)])) == "m"  # a UTM image: its metres
    wgs84 = QgsRasterLayer(write_raster(tmp_path / "wgs84.tif", epsg=4326, x0=15.0, y0=45.2), "wgs84", "gdal")
    assert width_units(plan_for(tmp_path, [Pair(wgs84, osm)])) == "m"  # a geographic image: metres, not degrees
    assert width_units(plan_for(tmp_path, [Pair(scene["image"], scene["mask"])])) == ""


def test_a_width_field_holding_text_is_refused(scene, tmp_path):
    roads = line_layer(fields="&field=Width:string")
    roads.dataProvider().changeAttributeValues({1: {0: "5 m"}})
    problems = check_plan(plan_for(tmp_path, [Pair(scene["image"], roads)], label_width=6.0))
    assert problems == [
        "Labelled pair 1: labels 'roads' hold '5 m' in their road width field 'Width', not a number: store plain "
        "numbers (5, not '5 m'), or rename the field so that the road width set here is used."
    ]
    roads.dataProvider().changeAttributeValues({1: {0: "5.5"}})
    assert check_plan(plan_for(tmp_path, [Pair(scene["image"], roads)], label_width=6.0)) == []


def test_raster_masks_must_lie_on_their_image_grid(scene, tmp_path):
    def problems(name, **kwargs):
        mask = QgsRasterLayer(write_raster(tmp_path / f"{name}.tif", **{"bands": 1, **kwargs}), name, "gdal")
        return check_plan(plan_for(tmp_path, [Pair(scene["image"], mask)]))

    fix = "resample it onto the image's grid (Raster > Align Rasters, with the image as reference layer)."
    assert problems("nearly", x0=500000.1) == []  # within a fraction of a pixel
    assert problems("rgb mask", bands=3) == [
        "Labelled pair 1: mask 'rgb mask' has 3 bands; a mask has one (roads > 0, background 0): choose a "
        "single-band mask, or keep its road band (Processing: Rearrange bands)."
    ]
    assert problems("small", size=16) == [
        f"Labelled pair 1: mask 'small' is 16 x 16 px but image 'image' is 32 x 32 px: {fix}"
    ]
    assert problems("shifted", x0=500002.0) == [
        "Labelled pair 1: mask 'shifted' covers another area than image 'image' (its corners lie up to 2.0 px "
        f"from the image's): {fix}"
    ]
    web = check_plan(plan_for(tmp_path, [Pair(scene["web"], scene["mask"])]))
    assert web == [
        "Labelled pair 1: mask 'mask' cannot be on the grid of web layer 'OpenStreetMap', which is exported at the "
        "map's resolution: use vector labels, or save the web layer as GeoTIFF (Export > Save As) and make the "
        "mask on its grid."
    ]


def test_the_same_imagery_is_never_both_trained_on_and_tested(scene, tmp_path):
    image, mask = scene["image"], scene["mask"]
    copy = QgsRasterLayer(image.source(), "image copy", "gdal")  # one file loaded twice
    other = QgsRasterLayer(write_raster(tmp_path / "other.tif"), "other", "gdal")
    other_copy = QgsRasterLayer(other.source(), "other copy", "gdal")
    inflated = "training would see the test image and inflate the test IoU"
    plan = plan_for(tmp_path, [Pair(image, mask)], test=[Pair(image, mask)])
    assert check_plan(plan) == [
        f"Test pair 1: image 'image' is also the image of labelled pair 1: {inflated}; test on another image."
    ]
    plan.test = [Pair(copy, mask)]
    assert check_plan(plan) == [
        f"Test pair 1: image 'image copy' is the same file as the image of labelled pair 1 ('image'): {inflated}; "
        "test on another image."
    ]
    plan.test, plan.unlabelled = [Pair(other, mask)], [other_copy]
    assert check_plan(plan) == [
        f"Test pair 1: image 'other' is the same file as an unlabelled image ('other copy'): {inflated}; untick "
        "'other copy' in Unlabelled images."
    ]
    plan.test, plan.unlabelled = [], []
    plan.labelled.append(Pair(copy, mask))
    assert check_plan(plan) == [
        "Labelled pair 2: image 'image copy' is the same file as the image of labelled pair 1 ('image'): use each "
        "image in one labelled pair."
    ]
    # Unlabelled layers of a labelled image's file are left out, and a file loaded twice is passed once.
    plan = plan_for(tmp_path, [Pair(image, mask)], unlabelled=[copy, other, other_copy])
    assert check_plan(plan) == []
    assert to_request(plan, str(tmp_path / "inputs")).unlabelled == [other.source()]


@pytest.fixture
def tiles(tmp_path):
    """A web (XYZ) layer served from files: one world tile of grey."""
    folder = tmp_path / "tiles" / "0" / "0"
    folder.mkdir(parents=True)
    tile = gdal.GetDriverByName("MEM").Create("", 256, 256, 3, gdal.GDT_Byte)
    for band in range(3):
        tile.GetRasterBand(band + 1).Fill(100)
    gdal.GetDriverByName("PNG").CreateCopy(str(folder / "0.png"), tile)
    url = f"file://{tmp_path}/tiles/%7Bz%7D/%7Bx%7D/%7By%7D.png"
    return QgsRasterLayer(f"type=xyz&url={url}&zmax=0&zmin=0", "tiles", "wms")


def test_web_layers_export_what_the_map_shows(scene, tiles, tmp_path):
    view = WebExtent(QgsRectangle(500000, 4999968, 500032, 5000000), scene["image"].crs(), 64)
    plan = plan_for(tmp_path, [Pair(tiles, scene["roads"])], label_width=6.0)
    assert check_plan(plan) == []
    ((image, _),) = to_request(plan, str(tmp_path / "inputs"), view).labelled
    assert QgsRasterLayer(image, "check", "gdal").isValid()
    # The map shows another place than the labels: the check before Start only knew the world-wide service.
    elsewhere = WebExtent(QgsRectangle(600000, 4999968, 600032, 5000000), scene["image"].crs(), 64)
    with pytest.raises(RuntimeError, match="Labels 'roads' are not on the visible map, where web layer 'tiles'"):
        to_request(plan, str(tmp_path / "inputs-2"), elsewhere)
    # A service that does not answer exports transparent black: refused, and nothing is left behind.
    plan.labelled = [Pair(scene["web"], scene["roads"])]
    with pytest.raises(RuntimeError, match="Web layer 'OpenStreetMap' could not be fetched"):
        to_request(plan, str(tmp_path / "inputs-3"), view)
    assert os.listdir(tmp_path / "inputs-3") == []
