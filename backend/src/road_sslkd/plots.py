"""Figures of the benchmark report: training curves, precision-recall curves, test overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

BINS = 200


def _pyplot():  # noqa: ANN202 - matplotlib's module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class PRAccumulator:
    """Histograms of road probability for road and background pixels: every threshold's PR from one pass."""

    def __init__(self) -> None:
        self.road = np.zeros(BINS, np.int64)
        self.background = np.zeros(BINS, np.int64)

    def update(self, prob: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> None:
        bins = np.clip((prob * BINS).astype(int), 0, BINS - 1)
        self.road += np.bincount(bins[valid & truth], minlength=BINS)
        self.background += np.bincount(bins[valid & ~truth], minlength=BINS)

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Precision and recall for thresholds at every bin edge (predicted road: prob >= edge)."""
        tp = np.cumsum(self.road[::-1])[::-1]
        fp = np.cumsum(self.background[::-1])[::-1]
        precision = tp / np.maximum(tp + fp, 1)
        recall = tp / max(self.road.sum(), 1)
        return precision, recall

    def iou(self, threshold: float) -> float:
        """Road IoU with road predicted where the probability reaches ``threshold`` (rounded to a bin edge)."""
        edge = min(BINS, max(0, round(threshold * BINS)))
        tp, fp = self.road[edge:].sum(), self.background[edge:].sum()
        fn = self.road[:edge].sum()
        return float(tp / max(tp + fp + fn, 1))


def _save_chart(plt, fig, ax, out: Path) -> Path:  # noqa: ANN001 - matplotlib's objects
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_curves(curves: dict[str, dict[str, list]], metric: str, out: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for stage, series in curves.items():
        if metric in series:
            steps, values = zip(*series[metric])
            ax.plot(steps, [100 * v for v in values], marker="o", ms=3, label=stage)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title("Road IoU during training" + (" (labelled training images)" if metric == "fit_iou" else ""))
    return _save_chart(plt, fig, ax, out)


def plot_pr(curves: dict[str, PRAccumulator], thresholds: dict[str, float], out: Path) -> Path:
    """One precision-recall curve per model, a dot where its decision threshold puts it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, acc in curves.items():
        precision, recall = acc.curve()
        ax.plot(recall, precision, label=name)
        edge = min(BINS - 1, round(thresholds[name] * BINS))
        ax.plot(recall[edge], precision[edge], "k.", ms=5)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Road precision-recall, test split (dots: decision thresholds)")
    return _save_chart(plt, fig, ax, out)


def plot_examples(images: list[np.ndarray], truths: list[np.ndarray], predictions: dict[str, list[np.ndarray]],
                  thresholds: dict[str, float], out: Path) -> Path:
    """One row per test image: the image with the true roads, then each model's roads (red, at its
    threshold) over it."""
    plt = _pyplot()
    cols = 1 + len(predictions)
    fig, axes = plt.subplots(len(images), cols, figsize=(2.8 * cols, 2.8 * len(images)), squeeze=False)
    for row, (rgb, truth) in enumerate(zip(images, truths)):
        base = rgb.astype(np.float32) / 255
        panels = [("ground truth", truth)]
        panels += [(name, preds[row] >= thresholds[name]) for name, preds in predictions.items()]
        for col, (title, mask) in enumerate(panels):
            shown = base.copy()
            colour = np.array([0.0, 1.0, 1.0]) if col == 0 else np.array([1.0, 0.1, 0.1])
            shown[mask] = 0.45 * shown[mask] + 0.55 * colour
            ax = axes[row][col]
            ax.imshow(shown)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
