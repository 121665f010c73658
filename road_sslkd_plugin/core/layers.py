"""Which layers can feed a training, checks of the user's choices, and exports of non-file layers.

Pure logic on QGIS layers (no widgets). Raster layers with a file GDAL reads are passed to the backend as
they are; other rasters (web services, in-memory /vsimem/ sources, GeoPackage raster tables) are written
to GeoTIFF by the plugin first; vector labels that are not a plain file (memory, database, filtered, or with
unsaved edits) are written to GeoPackage. Everything here runs on the main thread before the backend starts.
"""

from __future__ import annotations

import datetime
import functools
import math
import operator
import os
import tempfile
from dataclasses import dataclass, field
from typing import Optional

from osgeo import gdal, ogr
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCsException,
    QgsFeatureRequest,
    QgsMapLayer,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterFileWriter,
    QgsRasterLayer,
    QgsRasterPipe,
    QgsRectangle,
    QgsUnitTypes,
    QgsVectorFileWriter,
    QgsVectorLayer,
    QgsWkbTypes,
)

from ..compat import DISTANCE_METERS, qgis_enum
from . import settings
from .protocol import TrainRequest
from .results import RunFolder

WEB_PROVIDERS = {"wms", "wcs", "arcgismapserver", "arcgisfeatureserver", "xyz"}
MAX_WEB_EXPORT_PIXELS = 8000  # per side: a web layer at street zoom over a country would never finish
# The backend's data.GRID_TOLERANCE_PX and data.WIDTH_FIELDS (the plugin cannot import it): how far a mask's
# corners may lie from its image's, and the fields that hold a road line's width.
GRID_TOLERANCE_PX = 0.25
WIDTH_FIELDS = ("width_m", "width")


def layer_filter(*names: str) -> object:
    """Layer filter flags for QgsMapLayerComboBox, by name (``Qgis.LayerFilter`` since QGIS 3.34)."""
    flags = [qgis_enum(f"Qgis.LayerFilter.{name}", f"QgsMapLayerProxyModel.Filter.{name}") for name in names]
    return functools.reduce(operator.or_, flags)


def _is_raster(layer: QgsMapLayer) -> bool:
    return isinstance(layer, QgsRasterLayer)


def _is_vector(layer: QgsMapLayer) -> bool:
    return isinstance(layer, QgsVectorLayer)


def _geometry_kind(layer: QgsVectorLayer) -> str:
    kind = QgsWkbTypes.geometryType(layer.wkbType())
    # Enum names changed in QGIS 3.30 (Qgis.GeometryType); compare by name so both work.
    name = getattr(kind, "name", None) or {0: "Point", 1: "Line", 2: "Polygon"}.get(int(kind), "Unknown")
    return {"PointGeometry": "Point", "LineGeometry": "Line", "PolygonGeometry": "Polygon"}.get(name, name)


@dataclass
class LayerInfo:
    """How the backend gets a layer: ``path`` as it is, an ``export`` the plugin writes, or a ``reason``."""

    layer_id: str
    name: str
    path: Optional[str] = None
    export: str = ""  # "", "raster", "web", "vector"
    reason: str = ""

    @property
    def usable(self) -> bool:
        return not self.reason

    def note(self) -> str:
        """Short text for lists and tooltips."""
        if self.reason:
            return self.reason
        return {
            "raster": "copied to GeoTIFF before training",
            "web": "web layer: exported to GeoTIFF over the visible map extent at screen resolution",
            "vector": "copied to GeoPackage before training",
        }.get(self.export, self.path or "")


def _decoded_path(layer: QgsMapLayer) -> tuple[str, str]:
    parts = QgsProviderRegistry.instance().decodeUri(layer.providerType(), layer.source())
    return str(parts.get("path") or ""), str(parts.get("layerName") or "")


def describe_raster(layer: QgsRasterLayer) -> LayerInfo:
    """How a raster layer can be used as an image or a mask."""
    info = LayerInfo(layer.id(), layer.name())
    provider = layer.providerType()
    if not layer.isValid():
        info.reason = "the layer is not valid (missing file or service?)"
    elif provider in WEB_PROVIDERS:
        info.export = "web"
    elif provider == "gdal":
        path, sublayer = _decoded_path(layer)
        if path and os.path.isfile(path) and not sublayer:
            info.path = path
        elif layer.width() > 0 and layer.height() > 0:
            info.export = "raster"
        else:
            info.reason = "no file and no size to export"
    elif layer.dataProvider() is not None and layer.width() > 0 and layer.height() > 0:
        info.export = "raster"  # e.g. PostGIS raster: native size known, copy it
    else:
        info.reason = f"'{provider}' rasters cannot be exported; save the layer as GeoTIFF first"
    return info


def describe_vector(layer: QgsVectorLayer) -> LayerInfo:
    """How a vector layer can be used as road labels: lines or polygons only."""
    info = LayerInfo(layer.id(), layer.name())
    if not layer.isValid():
        info.reason = "the layer is not valid (missing file?)"
        return info
    kind = _geometry_kind(layer)
    if kind not in ("Line", "Polygon"):
        info.reason = f"{kind.lower()} layer: road labels must be lines or polygons"
        return info
    path, sublayer = _decoded_path(layer) if layer.providerType() == "ogr" else ("", "")
    # The backend reads a file's first layer; the provider of a layer opened by name lists only that layer.
    # A file under unsaved edits holds other features than the layer shows: the export takes the edits along.
    if (path and os.path.isfile(path) and not layer.subsetString() and not layer.isModified()
            and (not sublayer or _layer_count(path) <= 1)):
        info.path = path
    else:
        info.export = "vector"
    return info


def _layer_count(path: str) -> int:
    source = ogr.Open(path)
    return source.GetLayerCount() if source is not None else 0


def describe(layer: QgsMapLayer) -> LayerInfo:
    if _is_raster(layer):
        return describe_raster(layer)
    if _is_vector(layer):
        return describe_vector(layer)
    return LayerInfo(layer.id(), layer.name(), reason="neither a raster nor a vector layer")


def _ordered_layers(project: QgsProject) -> list[QgsMapLayer]:
    """Layers in the order of the Layers panel (top first), then any not in the tree."""
    ordered = [node.layer() for node in project.layerTreeRoot().findLayers() if node.layer() is not None]
    known = {layer.id() for layer in ordered}
    rest = [layer for layer in project.mapLayers().values() if layer.id() not in known]
    return ordered + sorted(rest, key=lambda layer: layer.name().lower())


def image_layers(project: Optional[QgsProject] = None) -> list[QgsRasterLayer]:
    """Raster layers that may serve as training images (usable ones and those with a reason)."""
    return [layer for layer in _ordered_layers(project or QgsProject.instance()) if _is_raster(layer)]


@dataclass
class Pair:
    """An image layer and its label layer (either may be unset while the user edits)."""

    image: Optional[QgsMapLayer] = None
    label: Optional[QgsMapLayer] = None


@dataclass
class RunPlan:
    """The user's choices with live layers, checked by ``check_plan`` and turned into a TrainRequest."""

    labelled: list[Pair]
    unlabelled: list[QgsMapLayer] = field(default_factory=list)
    test: list[Pair] = field(default_factory=list)
    output_folder: str = ""
    run_name: str = ""
    label_width: Optional[float] = None
    preset: str = "tiny"
    steps_scale: float = 1.0
    device: str = "auto"
    seed: Optional[int] = None
    config: str = ""
    stages: list[str] = field(default_factory=list)
    weights: str = ""
    bands: str = ""
    extra_args: list[str] = field(default_factory=list)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_folder, self.run_name)

    def has_vector_labels(self) -> bool:
        return any(_is_vector(pair.label) for pair in [*self.labelled, *self.test] if pair.label is not None)


def writable_folder_problem(folder: str) -> str:
    """'' when ``folder`` exists and is writable or can be created; else why not."""
    if not folder:
        return "Choose an output folder."
    path = os.path.abspath(folder)
    existing = path
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        return f"The output folder cannot be created: '{existing}' is a file."
    try:  # os.access says yes to root on read-only mounts, so really try
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError:
        return f"The output folder '{folder}' is not writable: choose another one."
    return ""


def _extent_in(layer: QgsMapLayer, crs: QgsCoordinateReferenceSystem) -> QgsRectangle:
    """The layer's extent in ``crs`` (as the backend reprojects vector labels); empty when it cannot go there."""
    if _is_vector(layer) and layer.isModified():
        # QGIS may give the saved file's extent (its first computation skips the edit buffer): ask the features.
        extent = QgsRectangle()
        extent.setMinimal()
        for feature in layer.getFeatures(QgsFeatureRequest().setNoAttributes()):
            if feature.hasGeometry():
                extent.combineExtentWith(feature.geometry().boundingBox())
    else:
        extent = layer.extent()
    if layer.crs() == crs or not (layer.crs().isValid() and crs.isValid()):
        return extent  # the backend compares coordinates as they are when either lacks a CRS
    try:
        return QgsCoordinateTransform(layer.crs(), crs, QgsProject.instance()).transformBoundingBox(extent)
    except QgsCsException:
        return QgsRectangle()


def _overlaps(image_extent: QgsRectangle, image_crs: QgsCoordinateReferenceSystem, labels: QgsMapLayer) -> bool:
    extent = _extent_in(labels, image_crs)
    return not extent.isNull() and image_extent.intersects(extent)


def _placement_problem(image: QgsRasterLayer, labels: QgsMapLayer, web: bool) -> str:
    """Why labels are not where training needs them ('' when they are): vector labels must overlap their image
    in any CRS (the backend reprojects them), a raster mask must lie on its image's pixel grid."""
    fix = "resample it onto the image's grid (Raster > Align Rasters, with the image as reference layer)"
    if _is_vector(labels) and labels.featureCount() == 0:
        return f"labels '{labels.name()}' have no features"
    if _is_raster(labels) and web:
        return (f"mask '{labels.name()}' cannot be on the grid of web layer '{image.name()}', which is exported at "
                "the map's resolution: use vector labels, or save the web layer as GeoTIFF (Export > Save As) "
                "and make the mask on its grid")
    if _is_raster(labels) and labels.crs() != image.crs():
        return (f"mask '{labels.name()}' is in {labels.crs().authid() or 'another CRS'} but image '{image.name()}' "
                f"is in {image.crs().authid() or 'another CRS'}: reproject and {fix}")
    if not _overlaps(image.extent(), image.crs(), labels):
        return f"labels '{labels.name()}' do not overlap image '{image.name()}'"
    if _is_vector(labels):
        return ""
    if (labels.width(), labels.height()) != (image.width(), image.height()):
        return (f"mask '{labels.name()}' is {labels.width()} x {labels.height()} px but image '{image.name()}' is "
                f"{image.width()} x {image.height()} px: {fix}")
    a, b = labels.extent(), image.extent()
    offset = max(max(abs(a.xMinimum() - b.xMinimum()), abs(a.xMaximum() - b.xMaximum())) / image.rasterUnitsPerPixelX(),
                 max(abs(a.yMinimum() - b.yMinimum()), abs(a.yMaximum() - b.yMaximum())) / image.rasterUnitsPerPixelY())
    if offset > GRID_TOLERANCE_PX:
        return (f"mask '{labels.name()}' covers another area than image '{image.name()}' (its corners lie up to "
                f"{offset:.1f} px from the image's): {fix}")
    return ""


def _width_field_problem(labels: QgsVectorLayer) -> str:
    """A text width field whose values are no numbers (``5 m``) stops the backend: say so before Start."""
    fields = labels.fields()
    names = {fields.at(i).name().lower(): i for i in range(fields.count())}
    index = next((names[name] for name in WIDTH_FIELDS if name in names), None)
    if index is None or fields.at(index).isNumeric():
        return ""
    for value in labels.uniqueValues(index):
        if isinstance(value, str) and value.strip():
            try:
                float(value)
            except ValueError:
                name = fields.at(index).name()
                return (f"labels '{labels.name()}' hold '{value}' in their road width field '{name}', not a "
                        "number: store plain numbers (5, not '5 m'), or rename the field so that the road width "
                        "set here is used")
    return ""


def _pair_problems(pair: Pair, number: int, what: str, width: Optional[float]) -> list[str]:
    label = f"{what} pair {number}"
    if pair.image is None or pair.label is None:
        missing = "an image" if pair.image is None else "a label layer"
        return [f"{label}: choose {missing}."]
    problems = []
    image, mask = describe(pair.image), describe(pair.label)
    if not _is_raster(pair.image):
        problems.append(f"{label}: '{pair.image.name()}' is not a raster layer.")
    elif not image.usable:
        problems.append(f"{label}: image '{image.name}' cannot be used: {image.reason}.")
    if not mask.usable:
        problems.append(f"{label}: labels '{mask.name}' cannot be used: {mask.reason}.")
    if problems:
        return problems
    if pair.image.id() == pair.label.id():
        return [f"{label}: the image cannot be its own label layer."]
    if _is_raster(pair.label) and pair.label.bandCount() != 1:
        problems.append(
            f"{label}: mask '{pair.label.name()}' has {pair.label.bandCount()} bands; a mask has one (roads > 0, "
            "background 0): choose a single-band mask, or keep its road band (Processing: Rearrange bands)."
        )
    if placement := _placement_problem(pair.image, pair.label, image.export == "web"):
        problems.append(f"{label}: {placement}.")
    if _is_vector(pair.label):
        if not (width and width > 0):
            problems.append(f"{label}: set the road width for vector labels.")
        if field_problem := _width_field_problem(pair.label):
            problems.append(f"{label}: {field_problem}.")
    return problems


def width_units(plan: RunPlan) -> str:
    """The unit of the road width (abbreviated; '' when unknown), as the backend buffers road lines: the
    image CRS's units, metres for a geographic image. The first pair with vector labels decides."""
    image = next((p.image for p in [*plan.labelled, *plan.test] if p.image is not None and _is_vector(p.label)), None)
    if image is None or not image.crs().isValid():
        return ""
    units = DISTANCE_METERS if image.crs().isGeographic() else image.crs().mapUnits()
    return QgsUnitTypes.toAbbreviatedString(units)


def _source_key(layer: QgsMapLayer) -> str:
    """What makes two image layers the same imagery: their file (one file may be loaded as two layers), else
    the layer itself."""
    path = describe(layer).path
    return os.path.normcase(os.path.realpath(path)) if path else layer.id()


def _same_as(layer: QgsMapLayer, first: QgsMapLayer, where: str) -> str:
    """'is also <where>', or 'is the same file as <where> (name)' for another layer of the same file."""
    return f"is also {where}" if layer.id() == first.id() else f"is the same file as {where} ('{first.name()}')"


def _shared_image_problems(labelled: list[Pair], test: list[Pair], unlabelled: list[QgsMapLayer]) -> list[str]:
    """One imagery in two labelled pairs, or a test image that training sees (as labelled or unlabelled)."""
    problems = []
    trained: dict[str, tuple[QgsMapLayer, str, str]] = {}  # source -> first layer, where it is, the fix
    for number, pair in enumerate(labelled, 1):
        if pair.image is None:
            continue
        key = _source_key(pair.image)
        if key in trained:
            first, where, _ = trained[key]
            problems.append(f"Labelled pair {number}: image '{pair.image.name()}' {_same_as(pair.image, first, where)}"
                            ": use each image in one labelled pair.")
        else:
            trained[key] = (pair.image, f"the image of labelled pair {number}", "test on another image")
    for layer in unlabelled:
        trained.setdefault(_source_key(layer), (layer, "an unlabelled image",
                                                f"untick '{layer.name()}' in Unlabelled images"))
    for number, pair in enumerate(test, 1):
        if pair.image is not None and (seen := trained.get(_source_key(pair.image))):
            first, where, fix = seen
            problems.append(f"Test pair {number}: image '{pair.image.name()}' {_same_as(pair.image, first, where)}: "
                            f"training would see the test image and inflate the test IoU; {fix}.")
    return problems


def parse_bands(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]; ValueError for anything else but ''."""
    bands = [int(part) for part in text.replace(" ", "").split(",") if part] if text.strip() else []
    if any(band < 1 for band in bands):
        raise ValueError(text)
    return bands


DEFAULT_BANDS = [1, 2, 3]  # what the backend reads when Bands is empty (its Config.bands)


def band_problems(plan: RunPlan) -> list[str]:
    """Every image must have the bands that training reads: those the Bands option names, else 1,2,3 (a mask
    ticked as unlabelled image is the usual slip). Web layers are skipped: their band count is known after
    the export."""
    try:
        chosen = parse_bands(plan.bands)
    except ValueError:
        return [f"Bands '{plan.bands}' must be band numbers like 1,2,3."]
    bands = chosen or DEFAULT_BANDS
    images = [("Labelled image", p.image) for p in plan.labelled] + [("Test image", p.image) for p in plan.test]
    images += [("Unlabelled image", layer) for layer in plan.unlabelled]
    asked = (f"Bands asks for band {max(bands)}." if chosen else
             f"training reads bands {','.join(map(str, bands))} unless Bands says otherwise: untick it, or "
             "choose the bands to use (Training, Advanced, Bands).")
    return [
        f"{what} '{layer.name()}' has {layer.bandCount()} band(s); {asked}"
        for what, layer in images
        if _is_raster(layer) and layer.isValid() and describe(layer).export != "web" and layer.bandCount() < max(bands)
    ]


def check_plan(plan: RunPlan) -> list[str]:
    """Everything that stops a training from starting, in words; [] when it can start."""
    problems: list[str] = []
    pairs = [pair for pair in plan.labelled if pair.image is not None or pair.label is not None]
    if not pairs:
        problems.append("Add at least one labelled pair: an image layer and its road label layer.")
    for number, pair in enumerate(pairs, 1):
        problems += _pair_problems(pair, number, "Labelled", plan.label_width)
    tests = [pair for pair in plan.test if pair.image is not None or pair.label is not None]
    for number, pair in enumerate(tests, 1):
        problems += _pair_problems(pair, number, "Test", plan.label_width)
    problems += _shared_image_problems(pairs, tests, plan.unlabelled)
    for layer in plan.unlabelled:
        info = describe(layer)
        if not _is_raster(layer) or not info.usable:
            problems.append(f"Unlabelled image '{layer.name()}' cannot be used: {info.reason or 'not a raster'}.")
    problems += band_problems(plan)
    folder_problem = writable_folder_problem(plan.output_folder)
    if folder_problem:
        problems.append(folder_problem)
    elif not plan.run_name.strip():
        problems.append("Choose a run name.")
    elif RunFolder(plan.run_dir).holds_run():
        problems.append(
            f"The run folder '{plan.run_dir}' already holds files (another run?). Nothing is overwritten: "
            "choose another run name."
        )
    if plan.config and not os.path.isfile(plan.config):
        problems.append(f"The config file '{plan.config}' does not exist.")
    return problems


def default_run_name() -> str:
    return datetime.datetime.now().strftime("run-%Y%m%d-%H%M")


def default_output_folder() -> str:
    """``road_sslkd_runs`` next to the project file, else the user's last choice, else in the home folder."""
    project_dir = QgsProject.instance().absolutePath()
    if project_dir:
        return os.path.join(project_dir, "road_sslkd_runs")
    fallback = os.path.join(os.path.expanduser("~"), "road_sslkd_runs")
    return str(settings.user_value("output_folder", fallback) or fallback)


def new_run_dir() -> str:
    """A new run folder in the default place (the dock's, for runs started elsewhere)."""
    folder = default_output_folder()
    return os.path.join(folder, free_run_name(folder, default_run_name()))


def free_run_name(output_folder: str, base: str) -> str:
    """``base``, or ``base-2``, ``base-3``... : the first name whose folder does not hold a run."""
    name, number = base, 1
    while RunFolder(os.path.join(output_folder, name)).holds_run() or os.path.exists(
        os.path.join(output_folder, name + ".inputs")
    ):
        number += 1
        name = f"{base}-{number}"
    return name


@dataclass
class WebExtent:
    """The visible map: where and how finely web layers are exported."""

    extent: QgsRectangle
    crs: QgsCoordinateReferenceSystem
    width_px: int


def _safe_name(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("._")
    return keep[:60] or "layer"


def export_raster(layer: QgsRasterLayer, path: str, web: Optional[WebExtent] = None) -> str:
    """Write ``layer`` to GeoTIFF: native grid, or for web layers the visible extent at screen resolution."""
    provider = layer.dataProvider()
    if provider is None:
        raise RuntimeError(f"'{layer.name()}' has no data provider")
    if layer.providerType() in WEB_PROVIDERS:
        if web is None:
            raise RuntimeError(f"'{layer.name()}' is a web layer: open the map view over the training area")
        transform = QgsCoordinateTransform(web.crs, layer.crs(), QgsProject.instance())
        extent = transform.transformBoundingBox(web.extent)
        extent = extent.intersect(layer.extent()) if not layer.extent().isEmpty() else extent
        cols = max(1, web.width_px)
        rows = max(1, int(round(cols * extent.height() / max(extent.width(), 1e-12))))
        if max(cols, rows) > MAX_WEB_EXPORT_PIXELS:
            raise RuntimeError(f"'{layer.name()}': the visible extent is too large to export ({cols} x {rows} px)")
    else:
        extent, cols, rows = layer.extent(), layer.width(), layer.height()
    if extent.isEmpty():
        raise RuntimeError(f"'{layer.name()}': the visible map does not overlap the layer")
    pipe = QgsRasterPipe()
    if not pipe.set(provider.clone()):
        raise RuntimeError(f"'{layer.name()}': cannot read the layer's data")
    writer = QgsRasterFileWriter(path)
    writer.setOutputFormat("GTiff")
    writer.setCreateOptions(["COMPRESS=DEFLATE", "TILED=YES", "BIGTIFF=IF_SAFER"])
    result = writer.writeRaster(pipe, cols, rows, extent, layer.crs(), QgsProject.instance().transformContext())
    if getattr(result, "value", result) != 0:
        raise RuntimeError(f"'{layer.name()}': writing {path} failed (error {result})")
    # A service that does not answer still "exports": transparent black, which would train as imagery.
    if layer.providerType() in WEB_PROVIDERS and _blank(path):
        os.remove(path)
        raise RuntimeError(f"Web layer '{layer.name()}' could not be fetched: its export over the visible map is "
                           "empty (all pixels transparent or black). Check that the map shows its imagery (network, "
                           "service, zoom level), then start again.")
    return path


def _blank(path: str) -> bool:
    """True when a raster holds nothing: every pixel transparent (alpha 0) or every band 0."""
    dataset = gdal.Open(path)
    bands = [dataset.GetRasterBand(i + 1) for i in range(dataset.RasterCount)]
    empty = [not band.ReadAsArray().any() for band in bands]
    alpha = [e for band, e in zip(bands, empty) if band.GetColorInterpretation() == gdal.GCI_AlphaBand]
    return any(alpha) or all(empty)


def export_vector(layer: QgsVectorLayer, path: str) -> str:
    """Write the (filtered) features of ``layer`` to a single-layer GeoPackage."""
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.fileEncoding = "UTF-8"
    options.layerName = "labels"
    # Not "fid": a GeoPackage's features added in an editing session have no fid yet, and the writer would take
    # the column as the new file's feature ids (two features with id 1); the source's fids stay a plain column.
    options.layerOptions = ["FID=road_sslkd_fid"]
    result = QgsVectorFileWriter.writeAsVectorFormatV3(layer, path, QgsProject.instance().transformContext(), options)
    error, message = result[0], result[1]
    if getattr(error, "value", error) != 0:
        raise RuntimeError(f"'{layer.name()}': writing {path} failed: {message}")
    return path


def _source_path(layer: QgsMapLayer, inputs_dir: str, web: Optional[WebExtent], used: dict[str, str]) -> str:
    if layer.id() in used:
        return used[layer.id()]
    info = describe(layer)
    if info.path:
        path = info.path
    else:
        os.makedirs(inputs_dir, exist_ok=True)
        stem = os.path.join(inputs_dir, f"{len(used):02d}_{_safe_name(layer.name())}")
        if info.export == "vector":
            path = export_vector(layer, stem + ".gpkg")
        else:
            path = export_raster(layer, stem + ".tif", web)
    used[layer.id()] = path
    return path


def _pair_paths(pair: Pair, inputs_dir: str, web: Optional[WebExtent], used: dict[str, str]) -> tuple[str, str]:
    image = _source_path(pair.image, inputs_dir, web, used)
    label = _source_path(pair.label, inputs_dir, web, used)
    if describe(pair.image).export == "web":  # the check before Start knew only the service's whole-world extent
        exported = QgsRasterLayer(image, pair.image.name(), "gdal")
        if not _overlaps(exported.extent(), exported.crs(), pair.label):
            raise RuntimeError(f"Labels '{pair.label.name()}' are not on the visible map, where web layer "
                               f"'{pair.image.name()}' is exported: pan the map over the labels, then start again.")
    return image, label


def needs_export(plan: RunPlan) -> bool:
    layers = [p.image for p in [*plan.labelled, *plan.test]] + [p.label for p in [*plan.labelled, *plan.test]]
    return any(layer is not None and describe(layer).export for layer in [*layers, *plan.unlabelled])


def to_request(plan: RunPlan, inputs_dir: str, web: Optional[WebExtent] = None) -> TrainRequest:
    """Plain-path TrainRequest for a checked plan, exporting non-file layers into ``inputs_dir`` first.

    Images used in a labelled or test pair (as a layer or as its file) are left out of the unlabelled set, and
    a file loaded as two unlabelled layers is passed once.
    """
    used: dict[str, str] = {}

    def paths(pairs: list[Pair]) -> list[tuple[str, str]]:
        return [_pair_paths(p, inputs_dir, web, used) for p in pairs if p.image is not None and p.label is not None]

    labelled, test = paths(plan.labelled), paths(plan.test)
    taken = {_source_key(p.image) for p in [*plan.labelled, *plan.test] if p.image is not None}
    unlabelled = []
    for layer in plan.unlabelled:
        if (key := _source_key(layer)) not in taken:
            taken.add(key)
            unlabelled.append(_source_path(layer, inputs_dir, web, used))
    width = plan.label_width if plan.has_vector_labels() else None
    if width is not None and not math.isfinite(width):
        width = None
    return TrainRequest(
        run_dir=plan.run_dir,
        labelled=labelled,
        unlabelled=unlabelled,
        test=test,
        preset=plan.preset,
        label_width=width,
        steps_scale=plan.steps_scale,
        device=plan.device,
        seed=plan.seed,
        config=plan.config or None,
        stages=list(plan.stages),
        weights=plan.weights or None,
        bands=plan.bands or None,
        extra_args=list(plan.extra_args),
    )
