"""Which layers can feed a training, checks of the user's choices, and exports of non-file layers.

Pure logic on QGIS layers (no widgets). Raster layers with a file GDAL reads are passed to the backend as
they are; other rasters (web services, in-memory /vsimem/ sources, GeoPackage raster tables) are written
to GeoTIFF by the plugin first; vector labels that are not a plain file (memory, database, filtered) are
written to GeoPackage. Everything here runs on the main thread before the backend starts.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import tempfile
from dataclasses import dataclass, field
from typing import Optional

from osgeo import ogr
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsMapLayer,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterFileWriter,
    QgsRasterLayer,
    QgsRasterPipe,
    QgsRectangle,
    QgsVectorFileWriter,
    QgsVectorLayer,
    QgsWkbTypes,
)

from ..compat import qgis_enum
from .protocol import TrainRequest
from .results import RunFolder

WEB_PROVIDERS = {"wms", "wcs", "arcgismapserver", "arcgisfeatureserver", "xyz"}
MAX_WEB_EXPORT_PIXELS = 8000  # per side: a web layer at street zoom over a country would never finish


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
    if path and os.path.isfile(path) and not layer.subsetString() and (not sublayer or _layer_count(path) <= 1):
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
    if pair.image.crs() != pair.label.crs():
        problems.append(
            f"{label}: labels '{pair.label.name()}' are in {pair.label.crs().authid() or 'another CRS'} but "
            f"image '{pair.image.name()}' is in {pair.image.crs().authid() or 'another CRS'}: reproject the "
            "labels to the image's CRS first (Processing: Reproject layer / Warp)."
        )
    elif _is_vector(pair.label) and pair.label.featureCount() == 0:
        problems.append(f"{label}: labels '{pair.label.name()}' have no features.")
    elif not pair.image.extent().intersects(pair.label.extent()):
        problems.append(f"{label}: labels '{pair.label.name()}' do not overlap image '{pair.image.name()}'.")
    if _is_vector(pair.label) and not (width and width > 0):
        problems.append(f"{label}: set the road width for vector labels.")
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
    for number, pair in enumerate(p for p in plan.test if p.image is not None or p.label is not None):
        problems += _pair_problems(pair, number + 1, "Test", plan.label_width)
    images = [pair.image.id() for pair in pairs if pair.image is not None]
    if len(images) != len(set(images)):
        problems.append("The same image is used in two labelled pairs.")
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
    return path


def export_vector(layer: QgsVectorLayer, path: str) -> str:
    """Write the (filtered) features of ``layer`` to a single-layer GeoPackage."""
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.fileEncoding = "UTF-8"
    options.layerName = "labels"
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


def needs_export(plan: RunPlan) -> bool:
    layers = [p.image for p in [*plan.labelled, *plan.test]] + [p.label for p in [*plan.labelled, *plan.test]]
    return any(layer is not None and describe(layer).export for layer in [*layers, *plan.unlabelled])


def to_request(plan: RunPlan, inputs_dir: str, web: Optional[WebExtent] = None) -> TrainRequest:
    """Plain-path TrainRequest for a checked plan, exporting non-file layers into ``inputs_dir`` first.

    Images used in a labelled or test pair are left out of the unlabelled set.
    """
    used: dict[str, str] = {}
    labelled = [
        (_source_path(p.image, inputs_dir, web, used), _source_path(p.label, inputs_dir, web, used))
        for p in plan.labelled
        if p.image is not None and p.label is not None
    ]
    test = [
        (_source_path(p.image, inputs_dir, web, used), _source_path(p.label, inputs_dir, web, used))
        for p in plan.test
        if p.image is not None and p.label is not None
    ]
    paired = {p.image.id() for p in [*plan.labelled, *plan.test] if p.image is not None}
    unlabelled = [_source_path(layer, inputs_dir, web, used) for layer in plan.unlabelled if layer.id() not in paired]
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
