"""Road-class segmentation metrics accumulated over whole rasters, nodata excluded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

RELAX_PIXELS = 3  # Mnih & Hinton's slack for relaxed precision / recall


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` (Euclidean) of a True pixel."""
    if not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask) <= radius


@dataclass
class RoadMetrics:
    """Counts of the road class; add rasters with ``update`` and read ratios as properties."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    relaxed_tp_pred: int = 0  # predicted road pixels within the slack of a true road pixel
    relaxed_tp_true: int = 0  # true road pixels within the slack of a predicted road pixel
    pred_total: int = 0
    true_total: int = 0

    def update(self, pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> None:
        pred, truth, valid = pred.astype(bool), truth.astype(bool), valid.astype(bool)
        p, t = pred & valid, truth & valid
        self.tp += int((p & t).sum())
        self.fp += int((p & ~t).sum())
        self.fn += int((~p & t).sum())
        self.relaxed_tp_pred += int((p & _dilate(truth, RELAX_PIXELS)).sum())
        self.relaxed_tp_true += int((t & _dilate(pred, RELAX_PIXELS)).sum())
        self.pred_total += int(p.sum())
        self.true_total += int(t.sum())

    @staticmethod
    def _ratio(a: int, b: int) -> float:
        return a / b if b else 0.0

    @property
    def precision(self) -> float:
        return self._ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return self._ratio(self.tp, self.tp + self.fn)

    @property
    def iou(self) -> float:
        return self._ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def f1(self) -> float:
        return self._ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def relaxed_f1(self) -> float:
        p = self._ratio(self.relaxed_tp_pred, self.pred_total)
        r = self._ratio(self.relaxed_tp_true, self.true_total)
        return 2 * p * r / (p + r) if p + r else 0.0

    def summary(self) -> dict[str, float]:
        return {"iou": self.iou, "f1": self.f1, "precision": self.precision, "recall": self.recall,
                "relaxed_f1": self.relaxed_f1}
