"""``road_sslkd:evaluate``: whole-raster metrics of a training run's models through ``road-sslkd evaluate``."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputString,
    QgsProcessingParameterFile,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterString,
)

from ..compat import FOLDER_ONLY, SOURCE_MAP_LAYER, SOURCE_RASTER
from ..core.protocol import pair_arg
from ..core.results import model_label
from .base import RoadAlgorithm
from .train import _file_path


def _run_test_split(config: str) -> list:
    """The test pairs a run folder's ``config.json`` recorded (its dataset's ``test`` split)."""
    try:
        with open(config, encoding="utf-8") as handle:
            return list(json.load(handle).get("dataset", {}).get("test") or [])
    except (OSError, ValueError, AttributeError) as exc:
        raise QgsProcessingException(f"{config} cannot be read ({exc}): is it a Road SSLKD run folder?") from exc


class EvaluateAlgorithm(RoadAlgorithm):
    RUN = "RUN"
    IMAGES = "TEST_IMAGES"
    MASKS = "TEST_MASKS"
    MODELS = "MODELS"
    METRICS = "METRICS"

    def name(self) -> str:
        return "evaluate"

    def displayName(self) -> str:  # noqa: N802
        return "Evaluate road models"

    def shortHelpString(self) -> str:  # noqa: N802
        return (
            "Road IoU, F1, precision, recall and relaxed F1 (a hit within 3 pixels counts) of the models of a "
            "training run, on whole test rasters.<br><br>"
            "<b>Run folder</b>: a folder written by <i>Train SSLKD road model</i> or <tt>road-sslkd train</tt>.<br>"
            "<b>Test images</b> and <b>Test labels</b> are paired in order (mask rasters, road &gt; 0, or road "
            "vectors); leave them empty to use the run's own test split.<br>"
            "<b>Models</b>: comma-separated names (e.g. student_sslkd,teacher_a); empty: every model of the run.<br>"
            "The metrics come back as JSON (output METRICS) and in the log. Needs the backend."
        )

    def initAlgorithm(self, config: Optional[dict] = None) -> None:  # noqa: N802
        self.addParameter(
            QgsProcessingParameterFile(self.RUN, "Run folder", FOLDER_ONLY)
        )
        self.addParameter(
            QgsProcessingParameterMultipleLayers(self.IMAGES, "Test images", SOURCE_RASTER, optional=True)
        )
        self.addParameter(
            QgsProcessingParameterMultipleLayers(
                self.MASKS, "Test labels (same order)", SOURCE_MAP_LAYER, optional=True
            )
        )
        self.addParameter(QgsProcessingParameterString(self.MODELS, "Models", optional=True))
        self.addOutput(QgsProcessingOutputString(self.METRICS, "Metrics (JSON)"))

    def processAlgorithm(
        self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> dict:  # noqa: N802
        from ..core.cli import run_backend

        run_dir = self.parameterAsFile(parameters, self.RUN, context)
        config = os.path.join(run_dir, "config.json")
        if not os.path.isfile(config):
            raise QgsProcessingException(f"{run_dir} is not a Road SSLKD run folder (no config.json)")
        images = self.parameterAsLayerList(parameters, self.IMAGES, context)
        masks = self.parameterAsLayerList(parameters, self.MASKS, context)
        if len(images) != len(masks):
            raise QgsProcessingException(f"{len(images)} test images but {len(masks)} labels: pair them in order")
        if not images and not _run_test_split(config):
            raise QgsProcessingException(
                f"The run {run_dir} was trained without test images: give TEST_IMAGES and TEST_MASKS (Test images "
                "and Test labels, paired in order)")
        args = ["evaluate", run_dir]
        if images:
            args += ["--test", *[pair_arg((_file_path(i), _file_path(m))) for i, m in zip(images, masks)]]
        models = self.parameterAsString(parameters, self.MODELS, context).replace(" ", "")
        if models:
            args += ["--models", models]

        def on_event(event: dict[str, Any]) -> None:
            if event.get("event") == "progress" and event.get("total"):
                feedback.setProgress(100.0 * event["step"] / event["total"])

        try:
            result = run_backend(args, on_event, feedback.pushDebugInfo, feedback.isCanceled)
        except (RuntimeError, OSError) as exc:
            raise QgsProcessingException(str(exc)) from exc
        if feedback.isCanceled():
            return {}
        done = next((e for e in result.events if e.get("event") == "done"), None)
        if not result.outcome.ok or done is None:
            hint = f" ({result.outcome.hint})" if result.outcome.hint else ""
            raise QgsProcessingException(f"{result.outcome.message}{hint}\n{result.outcome.details()}")
        metrics = done.get("results") or {}
        for name, values in metrics.items():
            scores = ", ".join(f"{k} {100 * v:.1f} %" for k, v in values.items() if isinstance(v, (int, float)))
            feedback.pushInfo(f"{model_label(name)}: {scores}")
        return {self.METRICS: json.dumps(metrics)}
