"""``road_sslkd:train``: teachers, cross-model SSL and the SSLKD student through ``road-sslkd train``.

Layers are passed to the backend as file paths (the backend reads rasters and vector labels itself);
progress events drive the feedback bar, Cancel sends SIGTERM (the run stays resumable:
``road_sslkd:resume_training``, ``road-sslkd train --resume``).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputFile,
    QgsProcessingOutputFolder,
    QgsProcessingOutputString,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsProcessingUtils,
)

from ..compat import FOLDER_ONLY, NUMBER_DOUBLE, NUMBER_INTEGER, SOURCE_MAP_LAYER, SOURCE_RASTER
from ..core.layers import DEFAULT_BANDS, describe, new_run_dir, parse_bands
from ..core.protocol import PRESETS, TrainRequest, overall_fraction, resume_args, stage_label
from ..core.results import RunFolder
from .base import RoadAlgorithm, advanced


def _file_path(layer: Any) -> str:
    """The file the backend reads for a layer, by the dock's rules (``core.layers.describe``); layers without
    one of their own (memory, web, filtered, one layer of a multi-layer GeoPackage) must be saved first."""
    info = describe(layer)
    if info.path:
        return info.path
    why = info.reason or "a memory, web or filtered layer, one layer of a multi-layer file, or unsaved edits"
    raise QgsProcessingException(
        f"{layer.name()} has no file of its own that the backend can read ({why}): save it to its own file "
        "first, or train from the dock, which exports such layers")


DEVICES = ("auto", "cpu", "cuda")
# Outputs shared by train and resume_training.
OUTPUT_FOLDER, MODEL, REPORT, METRICS = "OUTPUT_FOLDER", "MODEL", "REPORT", "METRICS"


def _temporary(folder: str) -> bool:
    """Whether ``folder`` lies in Processing's temporary folder, which QGIS deletes when it closes."""
    temp = os.path.realpath(QgsProcessingUtils.tempFolder())
    try:
        return os.path.commonpath([os.path.realpath(folder), temp]) == temp
    except ValueError:  # Windows: on another drive
        return False


def _band_problem(text: str, images: list[Any]) -> str:
    """Why BANDS does not fit the images, in Processing's words ('' when it does): the backend would say it
    only after starting, in its command-line words."""
    try:
        bands = parse_bands(text)
    except ValueError:
        return f"BANDS '{text}' must be 1-based band numbers like 3,2,1"
    needed = max(bands or DEFAULT_BANDS)
    short = [layer for layer in images if layer.bandCount() < needed]
    if not short:
        return ""
    count = short[0].bandCount()
    default = ",".join(map(str, DEFAULT_BANDS))
    asked = f"BANDS asks for band {needed}" if bands else f"an empty BANDS reads bands {default}"
    return (f"{short[0].name()} has {count} band{'s' if count != 1 else ''} but {asked}: choose bands every "
            "image has in BANDS (a label layer among the images is the usual slip)")


def _given(parameters: dict, name: str) -> bool:
    """Whether an optional number was set (Processing passes None or "" for an empty one)."""
    return parameters.get(name) not in (None, "")


class TrainAlgorithm(RoadAlgorithm):
    IMAGES = "LABELLED_IMAGES"
    LABELS = "LABELS"
    UNLABELLED = "UNLABELLED"
    PRESET = "PRESET"
    LABEL_WIDTH = "LABEL_WIDTH"
    STEPS_SCALE = "STEPS_SCALE"
    WEIGHTS = "ENCODER_WEIGHTS"
    SEED = "SEED"
    BANDS = "BANDS"
    DEVICE = "DEVICE"
    CONFIG = "CONFIG"
    TEST_IMAGES = "TEST_IMAGES"
    TEST_LABELS = "TEST_LABELS"

    def name(self) -> str:
        return "train"

    def displayName(self) -> str:  # noqa: N802
        return "Train SSLKD road model"

    def shortHelpString(self) -> str:  # noqa: N802
        return (
            "Trains two teachers on the labelled images, lets them teach each other on the unlabelled images "
            "(cross-model pseudo-labels), distils them (teacher B alone in the tiny and cpu presets) into a "
            "small student and exports it as ONNX "
            "(semi-supervised knowledge distillation).<br><br>"
            "<b>Labelled images</b> and <b>Labels</b> are paired in order: a mask raster (road &gt; 0) or a "
            "vector layer of road lines/polygons per image. <b>Label width</b> buffers road lines "
            "without a width field (in the image CRS's map units, metres for a geographic CRS).<br>"
            "<b>Preset</b>: tiny (a few minutes, for trying it out), cpu (a 2-core machine), gpu (the paper's "
            "networks); in scripts and qgis_process PRESET=0, 1 or 2, and DEVICE=0 (auto), 1 (cpu) or 2 (cuda)."
            "<br>"
            "<b>Encoder weights</b> (optional): imagenet (the cpu and gpu presets' choice: downloaded, or "
            "from the local cache), none, pretrain (learnt first from the labelled and unlabelled rasters "
            "themselves, self-supervised: better than none where imagenet cannot be downloaded, and longer), "
            "a weights file, or a folder with one file per encoder (resnet34.pth, mobilenet_v2.pth...).<br>"
            "<b>Advanced</b>: random seed, bands, device (cuda for a GPU) and a JSON settings file "
            "overriding any preset setting (README, 'The command line').<br>"
            "<b>Test images</b> and <b>Test labels</b> (optional, paired in order, never trained on) give the "
            "report and METRICS their IoU; without them the INT8 check uses the training rasters.<br>"
            "<b>Run folder</b> must be new or empty. Left temporary (the dialog's default, or a model's "
            "intermediate), the run goes to road_sslkd_runs next to the project (else in the home folder) "
            "instead: QGIS deletes temporary folders when it closes. Cancel stops the backend after a checkpoint: "
            "continue with <i>Resume SSLKD training</i>.<br>"
            "Needs the backend (dock: Set up backend)."
        )

    def initAlgorithm(self, config: Optional[dict] = None) -> None:  # noqa: N802
        self.addParameter(
            QgsProcessingParameterMultipleLayers(self.IMAGES, "Labelled images", SOURCE_RASTER)
        )
        self.addParameter(
            QgsProcessingParameterMultipleLayers(
                self.LABELS, "Labels (masks or road vectors, same order)", SOURCE_MAP_LAYER
            )
        )
        self.addParameter(
            QgsProcessingParameterMultipleLayers(
                self.UNLABELLED, "Unlabelled images", SOURCE_RASTER, optional=True
            )
        )
        for name, label in ((self.TEST_IMAGES, "Test images (optional)"),
                            (self.TEST_LABELS, "Test labels (same order)")):
            self.addParameter(QgsProcessingParameterMultipleLayers(
                name, label, SOURCE_RASTER if name == self.TEST_IMAGES else SOURCE_MAP_LAYER, optional=True))
        self.addParameter(QgsProcessingParameterEnum(self.PRESET, "Preset", list(PRESETS), defaultValue=1))
        self.addParameter(
            QgsProcessingParameterNumber(
                self.LABEL_WIDTH,
                "Road width for line labels (image CRS's map units; metres if geographic)",
                NUMBER_DOUBLE,
                optional=True,
                minValue=0.0,
            )
        )
        self.addParameter(
            QgsProcessingParameterNumber(
                self.STEPS_SCALE,
                "Training length (steps scale)",
                NUMBER_DOUBLE,
                defaultValue=1.0,
                minValue=0.01,
            )
        )
        self.addParameter(
            QgsProcessingParameterString(
                self.WEIGHTS, "Encoder weights (imagenet, none, pretrain, a file or a folder)", optional=True)
        )
        for parameter in (
            QgsProcessingParameterNumber(self.SEED, "Random seed", NUMBER_INTEGER,
                                         optional=True, minValue=0),
            QgsProcessingParameterString(self.BANDS, "Bands (1-based; empty: 1,2,3)", optional=True),
            QgsProcessingParameterEnum(self.DEVICE, "Device", list(DEVICES), defaultValue=0),
            QgsProcessingParameterFile(self.CONFIG, "Settings file (JSON, overrides the preset)", optional=True,
                                       extension="json"),
        ):
            self.addParameter(advanced(parameter))
        self.addParameter(QgsProcessingParameterFolderDestination(OUTPUT_FOLDER, "Run folder"))
        _add_run_outputs(self)

    def _pairs(self, parameters: dict, images: str, labels: str, what: str,
               context: QgsProcessingContext) -> list[tuple[Any, Any]]:
        """The image and label layers of two list parameters, paired in order."""
        found = [self.parameterAsLayerList(parameters, name, context) for name in (images, labels)]
        if len(found[0]) != len(found[1]):
            raise QgsProcessingException(f"{len(found[0])} {what} images but {len(found[1])} labels: give one label "
                                         "layer per image, same order")
        return list(zip(*found))

    def processAlgorithm(
        self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> dict:  # noqa: N802
        labelled = self._pairs(parameters, self.IMAGES, self.LABELS, "labelled", context)
        test = self._pairs(parameters, self.TEST_IMAGES, self.TEST_LABELS, "test", context)
        images = [image for image, _ in labelled]
        unlabelled = self.parameterAsLayerList(parameters, self.UNLABELLED, context)
        bands = self.parameterAsString(parameters, self.BANDS, context).strip()
        problem = _band_problem(bands, images + unlabelled)
        if problem:
            raise QgsProcessingException(problem)
        run_dir = os.path.abspath(self.parameterAsFileOutput(parameters, OUTPUT_FOLDER, context))
        if _temporary(run_dir):  # QGIS would delete the run, models included, when it closes
            run_dir = new_run_dir()
            feedback.pushWarning(f"The run folder was a temporary one, which QGIS deletes when it closes: the run "
                                 f"is kept in {run_dir} instead (choose a Run folder to decide where)")
        if os.path.isdir(run_dir) and any(os.scandir(run_dir)):
            raise QgsProcessingException(f"The run folder {run_dir} is not empty: choose a new folder")
        request = TrainRequest(
            run_dir=run_dir,
            labelled=[(_file_path(i), _file_path(label)) for i, label in labelled],
            test=[(_file_path(i), _file_path(label)) for i, label in test],
            unlabelled=[_file_path(layer) for layer in unlabelled],
            preset=PRESETS[self.parameterAsEnum(parameters, self.PRESET, context)],
            label_width=self.parameterAsDouble(parameters, self.LABEL_WIDTH, context)
            if _given(parameters, self.LABEL_WIDTH) else None,
            steps_scale=self.parameterAsDouble(parameters, self.STEPS_SCALE, context),
            weights=self.parameterAsString(parameters, self.WEIGHTS, context).strip() or None,
            seed=self.parameterAsInt(parameters, self.SEED, context) if _given(parameters, self.SEED) else None,
            bands=bands or None,
            device=DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)],
            config=self.parameterAsFile(parameters, self.CONFIG, context) or None,
        )
        return _train(request.to_args(), run_dir, feedback)


def _add_run_outputs(algorithm: RoadAlgorithm) -> None:
    algorithm.addOutput(QgsProcessingOutputFile(MODEL, "Student model (ONNX)"))
    algorithm.addOutput(QgsProcessingOutputFile(REPORT, "Report (Markdown)"))
    algorithm.addOutput(QgsProcessingOutputString(METRICS, "Metrics (JSON)"))


def _train(args: list[str], run_dir: str, feedback: QgsProcessingFeedback) -> dict:
    """Run ``road-sslkd ARGS`` for a training run in ``run_dir``: events to the feedback, products as outputs
    (none when cancelled: the run stays resumable)."""
    from ..core.cli import run_backend

    last_stage = [""]

    def on_event(event: dict) -> None:
        kind = event.get("event")
        if kind == "progress":
            stage = event.get("stage")
            if stage != last_stage[0]:
                last_stage[0] = stage
                feedback.pushInfo(f"Stage: {stage_label(stage)}")
            fraction = overall_fraction(stage, event.get("step") or 0, event.get("total") or 0)
            if fraction is not None:
                feedback.setProgress(100.0 * fraction)
        elif kind == "metric":
            feedback.pushInfo(f"{event.get('stage', '')} {event.get('name')}: {event.get('value')}")
        elif kind == "warning":
            feedback.pushWarning(str(event.get("message", "")))

    try:
        result = run_backend(args, on_event, feedback.pushDebugInfo, feedback.isCanceled, run_dir=run_dir)
    except (RuntimeError, OSError) as exc:
        raise QgsProcessingException(str(exc)) from exc
    outcome = result.outcome
    if not outcome.ok:
        details = f" ({outcome.hint})" if outcome.hint else ""
        if outcome.status == "cancelled":
            feedback.reportError(f"Training cancelled; continue it with Resume SSLKD training (RUN_FOLDER={run_dir}) "
                                 f"or road-sslkd train --resume {run_dir}")
            return {}
        raise QgsProcessingException(f"{outcome.message}{details}\n{outcome.details()}")
    model = RunFolder(run_dir).onnx or os.path.join(run_dir, "student.onnx")
    report = os.path.join(run_dir, "report.md")
    metrics_path = os.path.join(run_dir, "metrics.json")
    metrics = ""
    if os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as handle:
            metrics = handle.read()
    feedback.pushInfo(f"Student model: {model}")
    return {
        OUTPUT_FOLDER: run_dir,
        MODEL: model,
        REPORT: report if os.path.isfile(report) else "",
        METRICS: metrics,
    }


class ResumeTrainAlgorithm(RoadAlgorithm):
    """``road_sslkd:resume_training``: continue a stopped run from its last checkpoint (``train --resume``)."""

    RUN = "RUN_FOLDER"
    DEVICE = "DEVICE"
    DEVICES = ("the run's own", *DEVICES)

    def name(self) -> str:
        return "resume_training"

    def displayName(self) -> str:  # noqa: N802
        return "Resume SSLKD training"

    def shortHelpString(self) -> str:  # noqa: N802
        return (
            "Continues a training run that was cancelled, stopped by a crash or left when QGIS closed, from its "
            "last checkpoint, with the data and settings it was started with (its config.json). Finished stages "
            "are not trained again; a finished run only refreshes its report.<br><br>"
            "<b>Run folder</b>: the folder of <i>Train SSLKD road model</i> (its Run folder output), of the "
            "dock's training, or of <tt>road-sslkd train</tt>. A run still training is refused.<br>"
            "<b>Device</b> (advanced): the run's own (default), or another one from here on (cpu on a machine "
            "without the GPU it started on; DEVICE=0 the run's own, 1 auto, 2 cpu, 3 cuda).<br>"
            "The outputs are those of <i>Train SSLKD road model</i>: the student (ONNX), the report and the "
            "metrics. Needs the backend (dock: Set up backend)."
        )

    def initAlgorithm(self, config: Optional[dict] = None) -> None:  # noqa: N802
        self.addParameter(QgsProcessingParameterFile(self.RUN, "Run folder", FOLDER_ONLY))
        self.addParameter(advanced(QgsProcessingParameterEnum(self.DEVICE, "Device", list(self.DEVICES),
                                                              defaultValue=0)))
        self.addOutput(QgsProcessingOutputFolder(OUTPUT_FOLDER, "Run folder"))
        _add_run_outputs(self)

    def processAlgorithm(
        self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> dict:  # noqa: N802
        run_dir = os.path.abspath(self.parameterAsFile(parameters, self.RUN, context))
        if not RunFolder(run_dir).config:
            raise QgsProcessingException(
                f"{run_dir} is not a Road SSLKD run folder (no config.json): choose the Run folder a training "
                "wrote")
        device = self.parameterAsEnum(parameters, self.DEVICE, context)
        args = resume_args(run_dir) + (["--device", self.DEVICES[device]] if device else [])
        return _train(args, run_dir, feedback)
