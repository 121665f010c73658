"""The "Segment visible extent" action: roads over the map canvas extent, inference in a QgsTask.

Main thread: choose layer and model, plan the pixel window, read the pixels (QGIS providers are not
shared across threads). Task thread: ``model.predict_array`` only, with progress and cancel. Main thread
again: write the GeoTIFF and add it, styled, to the "Road SSLKD" layer group. With "Draw Road Centrelines" on,
a second task then has the backend's ``road-sslkd centrelines`` vectorise that GeoTIFF into a GeoPackage beside
it, added above it.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Iterator, Optional

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsLayerTreeGroup,
    QgsMapLayer,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterLayer,
    QgsTask,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QObject, pyqtSignal
from qgis.PyQt.QtWidgets import QFileDialog

from ..compat import RASTER_SIZE, TASK_CAN_CANCEL
from ..core import segment, settings

GROUP = "Road SSLKD"
KEEP_KEY = "segment/keep_results"  # user setting: keep earlier results instead of replacing them
LINES_KEY = "segment/draw_centrelines"  # user setting: also draw the road centre lines of each result
FOLDER_KEY = "segment/output_folder"  # user setting: where result GeoTIFFs go
LAST_LAYER_KEY = "segment/last_layer"  # project entry: id of the latest result layer
TITLE = "Road SSLKD"
RESULT = "road_sslkd/result"  # custom property of the layers this action adds: their files are its own
LINES_OF = "road_sslkd/centrelines_of"  # custom property of a centrelines layer: its probability layer's id
LINES_STYLE = "road_centrelines.qml"
SPUR_M = 10.0  # centreline spurs shorter than this are pruned (the backend's default)
SIDE_FILES = (".aux.xml", "-wal", "-shm")  # GDAL's statistics of a GeoTIFF, SQLite's journal of a GeoPackage


def _user_flag(key: str) -> bool:
    return str(settings.user_value(key, "false")).lower() in ("true", "1")


def keep_results() -> bool:
    return _user_flag(KEEP_KEY)


def draw_centrelines() -> bool:
    return _user_flag(LINES_KEY)


def output_folder(project: QgsProject) -> str:
    """The setting; else ``road_sslkd_segmentations`` next to a saved project, else in the home folder (not the
    temp folder: a project saved later keeps pointing at its results)."""
    folder = str(settings.user_value(FOLDER_KEY, "") or "")
    if folder:
        return folder
    home = project.homePath() if project.fileName() else ""
    return os.path.join(home or os.path.expanduser("~"), "road_sslkd_segmentations")


def _file_of(layer: QgsMapLayer) -> str:
    """The file a layer reads (its source less options such as ``|layername=``)."""
    return QgsProviderRegistry.instance().decodeUri(layer.providerType(), layer.source()).get("path", "")


def _remove_files(path: str) -> None:
    """Delete ``path`` and the files GDAL or SQLite keep beside it."""
    for name in (path, *(path + side for side in SIDE_FILES)):
        try:
            os.remove(name)
        except OSError:
            pass  # already gone, or held open elsewhere (Windows): it stays


def _replace(project: QgsProject, result_id: str) -> list[QgsMapLayer]:
    """Remove the result layer ``result_id`` and its centrelines, whichever of them the user has not removed by
    hand, then their files (the GeoTIFF and the GeoPackage named after it) unless another layer shows them.

    A layer with unsaved edits stays, with its file (removing it would drop them unasked): the layers kept.
    """
    old = [layer for layer in project.mapLayers().values() if result_id in (layer.id(), layer.customProperty(LINES_OF))]
    stems = {os.path.splitext(_file_of(layer))[0] for layer in old if layer.customProperty(RESULT)}
    edited = [layer for layer in old if layer.isModified()]
    project.removeMapLayers([layer.id() for layer in old if layer not in edited])
    shown = {_file_of(layer) for layer in project.mapLayers().values()}
    for path in (stem + ext for stem in stems for ext in (".tif", ".gpkg")):
        if path not in shown:
            _remove_files(path)
    return edited


def readable_raster(layer: Optional[QgsMapLayer]) -> bool:
    """A valid raster layer whose provider returns pixel blocks (not a WMS-like image-only source)."""
    if not isinstance(layer, QgsRasterLayer) or not layer.isValid():
        return False
    provider = layer.dataProvider()
    return provider is not None and bool(provider.capabilities() & RASTER_SIZE)


def _candidates(project: QgsProject, active: Optional[QgsMapLayer]) -> Iterator[QgsMapLayer]:
    """The active layer, then the visible ones from the top; result layers skipped."""
    root = project.layerTreeRoot()
    visible = []
    for layer in root.layerOrder() or [n.layer() for n in root.findLayers()]:
        node = root.findLayer(layer.id())
        if node is not None and node.isVisible():
            visible.append(layer)
    for layer in [active, *visible]:
        if layer is not None and not layer.customProperty(RESULT):
            yield layer


def default_layer(project: QgsProject, active: Optional[QgsMapLayer] = None) -> Optional[QgsRasterLayer]:
    """The active layer when it is a readable raster, else the topmost visible one (result layers skipped)."""
    return next((layer for layer in _candidates(project, active) if readable_raster(layer)), None)


def no_layer_error(project: QgsProject, active: Optional[QgsMapLayer] = None) -> segment.SegmentError:
    """Why ``default_layer`` found nothing: a web (WMS/XYZ) layer in view is named, with how to segment it."""
    web = next(
        (layer for layer in _candidates(project, active) if isinstance(layer, QgsRasterLayer) and layer.isValid()),
        None,
    )
    if web is None:
        return segment.SegmentError("No visible raster layer to segment", "add or show an image layer")
    return segment.SegmentError(
        f"The layer {web.name()} is a web or image-only layer: its pixels cannot be read",
        "save the area as a GeoTIFF (right-click the layer > Export > Save As..., Rendered image, "
        "Map canvas extent) and segment that layer",
    )


Work = Callable[[Callable[[int, int], None], Callable[[], bool]], Any]  # (progress, cancelled) -> result


class SegmentTask(QgsTask):
    """Runs ``work(progress, cancelled)`` in QGIS's task manager; ``done(result or None, error)`` on the main thread."""

    def __init__(self, work: Work, activity: str, done: Callable[[Any, str], None]) -> None:
        super().__init__(f"{TITLE}: {activity}", TASK_CAN_CANCEL)
        self.work, self.activity, self.done = work, activity, done
        self.result: Any = None
        self.error = ""

    def run(self) -> bool:
        try:
            self.result = self.work(lambda done, total: self.setProgress(100.0 * done / max(total, 1)), self.isCanceled)
        except segment.SegmentError as exc:
            self.error = str(exc)
            return False
        except Exception as exc:  # noqa: BLE001 - shown to the user, never lost in a worker thread
            self.error = f"{type(exc).__name__}: {exc}"
            return False
        return self.result is not None

    def finished(self, ok: bool) -> None:  # noqa: FBT001 - QgsTask's signature
        self.work = None  # free the input pixels as soon as possible
        self.done(self.result if ok else None, self.error)


def _group(project: QgsProject) -> QgsLayerTreeGroup:
    """The "Road SSLKD" layer group, made at the top of the layer tree when missing."""
    root = project.layerTreeRoot()
    group = root.findGroup(GROUP)
    return group if isinstance(group, QgsLayerTreeGroup) else root.insertGroup(0, GROUP)


class ExtentSegmenter(QObject):
    """Segments the canvas extent of the chosen raster layer; emits ``finished(layer or None, message)`` for the
    probability layer, then, when centrelines are drawn, ``centrelines_finished(line layer or None, message)``."""

    finished = pyqtSignal(object, str)
    centrelines_finished = pyqtSignal(object, str)

    def __init__(self, iface: Any, parent: Optional[QObject] = None) -> None:
        super().__init__(parent)
        self.iface = iface
        self.task: Optional[SegmentTask] = None
        self._model: Any = None
        self._model_key: tuple[str, float] = ("", 0.0)
        self.closed = False
        self._left_project = False  # another project was opened (or a new one begun) while a task ran
        QgsProject.instance().cleared.connect(self._project_cleared)

    def _project_cleared(self) -> None:
        self._left_project = self.task is not None

    # ----------------------------------------------------------------- choices
    def model_path(self) -> str:
        return settings.selected_model()

    def choose_model(self) -> str:
        """File dialog for any ONNX model; the choice becomes the project's model."""
        start = self.model_path() or os.path.expanduser("~")
        path, _ = QFileDialog.getOpenFileName(
            self.iface.mainWindow(), "Choose a road model", start, "ONNX models (*.onnx);;All files (*)"
        )
        if path:
            settings.set_selected_model(path)
        return path

    def _load(self, path: str) -> Any:
        """The model, cached while the file is unchanged (loading costs a second or so)."""
        key = (path, os.path.getmtime(path) if os.path.isfile(path) else 0.0)
        if self._model is None or key != self._model_key:
            self._model = segment.load_model(path)
            self._model_key = key
        return self._model

    def is_running(self) -> bool:
        return self.task is not None

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def shutdown(self) -> None:
        """Plugin unload: cancel a running task (segmentation or centrelines) and ignore its result."""
        self.closed = True
        self.cancel()

    # ----------------------------------------------------------------- run
    def run(self, layer: Optional[QgsRasterLayer] = None, model_path: Optional[str] = None) -> bool:
        """Start a segmentation of the visible extent; False (and a message) when it cannot start."""
        if self.task is not None:  # the segmentation, or the centrelines drawn after it
            self._message(
                f"Still {self.task.activity}: try again when it ends, or cancel it in QGIS's task bar.",
                Qgis.MessageLevel.Info,
            )
            return False
        project = QgsProject.instance()
        canvas = self.iface.mapCanvas()
        layer = layer or default_layer(project, self.iface.activeLayer())
        path = model_path or self.model_path()
        if not path:
            path = self.choose_model()
        late: list[str] = []  # the backend's warnings, collected in the task's thread and shown when it ends
        try:
            if layer is None:
                raise no_layer_error(project, self.iface.activeLayer())
            if segment.engine_available():
                work, window, warnings, threshold = self._in_process(layer, path, canvas, project)
            else:  # QGIS's Python has no onnxruntime: the backend's `road-sslkd predict` does the inference
                work, window, warnings, threshold = self._with_backend(layer, path, canvas, project, late.append)
        except segment.SegmentError as exc:
            self._fail(exc.message, exc.hint)
            return False
        for warning in warnings:
            self._message(warning, Qgis.MessageLevel.Warning)
        name = layer.name()
        folder = output_folder(project)  # the run's project's, even if another one is open when it ends
        self._left_project = False

        def done(result: Any, error: str) -> None:
            self.task = None
            # The backend's task answers with its file and the road threshold it read from the model.
            result, used = result if isinstance(result, tuple) else (result, threshold)
            try:
                if not self.closed:
                    for warning in late:
                        self._message(warning, Qgis.MessageLevel.Warning)
                    self._finish(result, error, layer.name() if not _deleted(layer) else name, window, folder, used)
            finally:
                if isinstance(result, str):  # the backend's scratch folder, whether its file was placed or not
                    shutil.rmtree(os.path.dirname(result), ignore_errors=True)

        self.task = SegmentTask(work, f"segmenting {name} ({window.width} x {window.height} px)", done)
        QgsApplication.taskManager().addTask(self.task)
        return True

    def _window(self, layer: QgsRasterLayer, canvas: Any, project: QgsProject, resolution_cm: Any) -> Any:
        map_settings = canvas.mapSettings()
        return segment.plan_window(
            layer, map_settings.visibleExtent(), map_settings.destinationCrs(), resolution_cm, project=project
        )

    def _in_process(self, layer: QgsRasterLayer, path: str, canvas: Any, project: QgsProject) -> tuple:
        """Pixels read here (main thread); the task only runs the model on them. The work, its window, warnings
        and the model's road threshold."""
        model = self._load(path)
        # The map action has no band choice: the model's training bands, with Processing's for other bands.
        bands, notes = segment.check_input(layer, model.info, option="BANDS of Processing's Segment roads")
        window = self._window(layer, canvas, project, model.info.resolution_cm)
        notes.append(segment.resolution_note(layer, model.info, window))
        pixels = segment.read_bands(layer.dataProvider(), window, bands)

        def work(progress: Callable[[int, int], None], cancelled: Callable[[], bool]) -> Any:
            return segment.predict(model, pixels, progress, cancelled)

        return work, window, [note for note in (*model.warnings, *notes) if note], model.info.threshold

    def _with_backend(
        self, layer: QgsRasterLayer, path: str, canvas: Any, project: QgsProject, warn: Callable[[str], None]
    ) -> tuple:
        """The window at the layer's resolution to a scratch GeoTIFF; the task runs ``road-sslkd predict`` on it.

        The backend reads the model's bands and resolution itself and answers on the window's grid; its
        warnings (bands, data type, resolution) go to ``warn``, from the task's thread. The task's result is
        the probability file and the model's road threshold, which the backend reads from the model.
        """
        if not os.path.isfile(path):
            raise segment.SegmentError(f"model file not found: {path}", "give the path of an .onnx model")
        window = self._window(layer, canvas, project, None)
        pixels = segment.read_bands(layer.dataProvider(), window, list(range(1, layer.bandCount() + 1)))
        scratch = tempfile.mkdtemp(prefix="road_sslkd_extent_")
        try:
            source = segment.write_geotiff(os.path.join(scratch, "window.tif"), pixels, window)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        del pixels
        label = f"the layer {layer.name()}"  # layers are not touched from the task's thread

        def work(progress: Callable[[int, int], None], cancelled: Callable[[], bool]) -> Any:
            produced = None
            try:
                produced = segment.predict_with_backend(path, source, scratch, label, progress, cancelled, warn=warn)
                if produced is not None:
                    kept = os.path.join(scratch, "probability.tif")
                    os.replace(produced[0], kept)
                    produced = kept, produced[1]  # a file: _finish moves it to the output folder
                return produced
            finally:
                os.remove(source)
                if produced is None:
                    shutil.rmtree(scratch, ignore_errors=True)

        warning = "onnxruntime is not available in QGIS's Python: using the backend (road-sslkd predict)"
        return work, window, [warning], None  # the threshold comes with the task's result

    def _finish(
        self, result: Any, error: str, name: str, window: segment.ReadWindow, folder: str, threshold: float
    ) -> None:
        if result is None:
            text = f"Segmentation failed: {error}" if error else "Segmentation cancelled."
            self._message(text, Qgis.MessageLevel.Critical if error else Qgis.MessageLevel.Info)
            self.finished.emit(None, text)
            return
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S_%f")
        safe = re.sub(r"[^\w.-]+", "_", name).strip("_") or "layer"
        path = os.path.join(folder, f"roads_{safe}_{stamp}.tif")
        try:
            if isinstance(result, str):  # the backend's file
                segment.place_file(result, path)
            else:
                segment.write_geotiff(path, result, window)
        except (OSError, RuntimeError, segment.SegmentError) as exc:
            text = f"Cannot write the result: {exc}"
            self._message(text, Qgis.MessageLevel.Critical)
            self.finished.emit(None, text)
            return
        if self._left_project:  # its result must not land in (nor replace a result of) another project
            text = f"Roads segmented in {name}: {path} (not added to the map: another project was opened meanwhile)"
            self._message(text, Qgis.MessageLevel.Info)
            self.finished.emit(None, text)
            return
        layer = self.add_result(QgsProject.instance(), path, f"Roads — {name}")
        text = f"Roads segmented in {name}: {path}"
        self._message(text, Qgis.MessageLevel.Success)
        if draw_centrelines():
            self._draw_centrelines(layer, name, threshold)
        self.finished.emit(layer, text)

    def _draw_centrelines(self, result: QgsRasterLayer, name: str, threshold: float) -> None:
        """Start the task that vectorises ``result`` into a GeoPackage beside it (``road-sslkd centrelines``)."""
        probability, result_id = result.source(), result.id()
        lines = os.path.splitext(probability)[0] + ".gpkg"
        late: list[str] = []  # the backend's warnings (no pixel at the threshold...), shown when the task ends

        def work(progress: Callable[[int, int], None], cancelled: Callable[[], bool]) -> Optional[str]:
            if segment.centrelines_with_backend(probability, lines, threshold, SPUR_M, cancelled, warn=late.append):
                return lines
            _remove_files(lines)  # cancelled once the backend had written it: no layer will show it
            return None

        def done(written: Optional[str], error: str) -> None:
            self.task = None
            if not self.closed:
                for warning in late:
                    self._message(warning, Qgis.MessageLevel.Warning)
                self._finish_centrelines(written, error, name, threshold, result_id)

        self.task = SegmentTask(work, f"drawing the centrelines of {name}", done)
        QgsApplication.taskManager().addTask(self.task)

    def _finish_centrelines(
        self, path: Optional[str], error: str, name: str, threshold: float, result_id: str
    ) -> None:
        layer = None
        if path is None:
            if error:
                text, level = f"Centrelines not drawn: {error}", Qgis.MessageLevel.Warning
            else:
                text, level = "Centrelines cancelled.", Qgis.MessageLevel.Info
        elif self._left_project:  # like the probability layer: nothing lands in another project
            text = f"Centrelines of {name}: {path} (not added to the map: another project was opened meanwhile)"
            level = Qgis.MessageLevel.Info
        else:
            layer = self.add_centrelines(QgsProject.instance(), path, f"Centrelines — {name}", result_id)
            text, level = f"Centrelines of {name} (threshold {threshold:g}): {path}", Qgis.MessageLevel.Success
        self._message(text, level)
        self.centrelines_finished.emit(layer, text)

    def add_result(self, project: QgsProject, path: str, title: str) -> QgsRasterLayer:
        """Add the GeoTIFF, styled, at the top of the "Road SSLKD" group; replace the last result (with its
        centrelines) unless kept."""
        last = settings.project_value(LAST_LAYER_KEY, "", project)
        if last and not keep_results():
            for kept in _replace(project, last):
                self._message(f"{kept.name()} has unsaved edits: kept, not replaced.", Qgis.MessageLevel.Warning)
        layer = QgsRasterLayer(path, title, "gdal")
        segment.style_layer(layer)
        layer.setCustomProperty(RESULT, True)  # after the style: loading a QML replaces them
        project.addMapLayer(layer, False)
        _group(project).insertLayer(0, layer)
        settings.set_project_value(LAST_LAYER_KEY, layer.id(), project)
        return layer

    def add_centrelines(self, project: QgsProject, path: str, title: str, result_id: str) -> QgsVectorLayer:
        """Add the GeoPackage's lines, styled, just above their probability layer (at the top of the "Road SSLKD"
        group when that layer is gone); they are replaced with it."""
        layer = QgsVectorLayer(f"{path}|layername=centrelines", title, "ogr")
        style = segment.style_path(LINES_STYLE)
        if style:
            layer.loadNamedStyle(style)
        layer.setCustomProperty(RESULT, True)  # after the style, as for the probability layer
        layer.setCustomProperty(LINES_OF, result_id)
        project.addMapLayer(layer, False)
        below = project.layerTreeRoot().findLayer(result_id)
        if below is not None:
            parent = below.parent()
            parent.insertLayer(parent.children().index(below), layer)
        else:
            _group(project).insertLayer(0, layer)
        return layer

    # ----------------------------------------------------------------- messages
    def _fail(self, message: str, hint: str) -> None:
        text = f"{message}: {hint}" if hint else message
        self._message(text, Qgis.MessageLevel.Warning)
        self.finished.emit(None, text)

    def _message(self, text: str, level: Qgis.MessageLevel) -> None:
        bar = self.iface.messageBar() if self.iface is not None else None
        if bar is not None:
            bar.pushMessage(TITLE, text, level, 8 if level != Qgis.MessageLevel.Critical else 0)


def _deleted(obj: Any) -> bool:
    from qgis.PyQt import sip

    return sip.isdeleted(obj)
