"""Processing algorithms of the Road SSLKD provider (toolbox, batch, graphical models, ``qgis_process``)."""

from __future__ import annotations

from qgis.core import QgsProcessingAlgorithm


def all_algorithms() -> list[QgsProcessingAlgorithm]:
    """New instances of every algorithm the provider offers."""
    from .centrelines import CentrelinesAlgorithm
    from .evaluate import EvaluateAlgorithm
    from .segment_roads import SegmentRoadsAlgorithm
    from .train import ResumeTrainAlgorithm, TrainAlgorithm

    return [SegmentRoadsAlgorithm(), CentrelinesAlgorithm(), TrainAlgorithm(), ResumeTrainAlgorithm(),
            EvaluateAlgorithm()]
