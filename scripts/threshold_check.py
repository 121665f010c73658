"""Each model's IoU at its decision threshold against 0.5, over finished runs.

The check of docs/benchmarks/cil_road_2016/threshold_validation.md:

    python scripts/threshold_check.py runs/val/work_0/seed_0 runs/val/work_1/seed_1 runs/val/work_2/seed_2

Prints markdown: per model and run, IoU at the threshold and at 0.5 (from metrics.json, as the report has
them) and Δ = the first minus the second; then precision and recall at both (from the test histograms).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from road_sslkd.plots import BINS
from road_sslkd.runs import RunDir

STUDENTS = ("student_supervised", "student_ssl", "student_kd", "student_sslkd")


def _precision_recall(run: RunDir, name: str, threshold: float) -> tuple[float, float]:
    precision, recall = run.load_evaluation(name)[0].curve()
    edge = min(BINS - 1, max(0, round(threshold * BINS)))
    return float(precision[edge]), float(recall[edge])


def table(paths: list[Path]) -> str:
    runs = [RunDir.open(p) for p in paths]
    metrics = [r.metrics()["models"] for r in runs]
    names = [n for n in metrics[0] if all("iou" in m.get(n, {}) for m in metrics)]
    head = " | ".join(f"{p.name}: thr / IoU / @0.5 / Δ" for p in paths)
    lines = [f"| Model | {head} | mean Δ |", "|---" * (len(paths) + 2) + "|"]
    deltas: dict[str, list[float]] = {}
    for name in names:
        cells = []
        for m in metrics:
            v = m[name]
            deltas.setdefault(name, []).append(100 * (v["iou"] - v["iou_at_0.5"]))
            cells.append(f"{v['threshold']:.2f} / {100 * v['iou']:.1f} / {100 * v['iou_at_0.5']:.1f} / "
                         f"{deltas[name][-1]:+.1f}")
        lines.append(f"| {name} | {' | '.join(cells)} | {np.mean(deltas[name]):+.1f} |")
    every = [d for ds in deltas.values() for d in ds]
    summary = f"Mean Δ over {len(every)} (model, run) pairs: {np.mean(every):+.2f} (spread {np.std(every):.2f})"
    students = [d for n in STUDENTS if n in deltas for d in deltas[n]]
    if students:
        summary += f"; students {np.mean(students):+.2f}"
    if "student_sslkd" in deltas:
        summary += f"; SSLKD {np.mean(deltas['student_sslkd']):+.2f}"
    lines += ["", summary + ".", "", "| Model | precision / recall at threshold | at 0.5 |", "|---|---|---|"]
    for name in names:
        at = [_precision_recall(r, name, m[name]["threshold"]) for r, m in zip(runs, metrics)]
        half = [_precision_recall(r, name, 0.5) for r in runs]
        cells = [f"{100 * np.mean([p for p, _ in pr]):.1f} / {100 * np.mean([q for _, q in pr]):.1f}"
                 for pr in (at, half)]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders (a bench work folder's seed_K)")
    print(table(parser.parse_args().runs))


if __name__ == "__main__":
    main()
