"""Reading a finished run folder (metrics.json, report.md, student.onnx) into rows the dock shows."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

# Display order and names of the models metrics.json may hold (fixed names of DESIGN.md's report).
MODEL_NAMES = {
    "teacher_a": "Teacher A",
    "teacher_b": "Teacher B",
    "teacher_a_ssl": "Teacher A + SSL",
    "teacher_b_ssl": "Teacher B + SSL",
    "student_supervised": "Student, supervised",
    "student_ssl": "Student, classic SSL",
    "student_kd": "Student, KD only",
    "student_sslkd": "Student SSLKD",
}
MODEL_HELP = {
    "teacher_a": "First teacher, trained on the labelled data only",
    "teacher_b": "Second teacher (another architecture), trained on the labelled data only",
    "teacher_a_ssl": "Teacher A after cross-model semi-supervised training with teacher B on unlabelled data",
    "teacher_b_ssl": "Teacher B after cross-model semi-supervised training with teacher A on unlabelled data",
    "student_supervised": "Baseline: the small student trained on the labelled data only",
    "student_ssl": "Baseline: the small student with a traditional semi-supervised method",
    "student_kd": "Baseline: the student distilled from the supervised teacher(s) without unlabelled data",
    "student_sslkd": "The student distilled from the cross-model teacher(s) on all the data: the exported model",
}
STUDENT = "student_sslkd"


def model_label(key: str) -> str:
    """Readable model name ("teacher_a_ssl" -> "Teacher A (cross-model SSL)")."""
    return MODEL_NAMES.get(key, key.replace("_", " ").capitalize())


@dataclass
class ResultRow:
    """One model of a run, formatted for the results table (raw values kept for sorting and tests)."""

    key: str
    name: str
    iou: Optional[float]
    f1: Optional[float]
    params: Optional[float]
    mpx_per_s: Optional[float]

    @property
    def is_student(self) -> bool:
        return self.key == STUDENT

    @property
    def help(self) -> str:
        return MODEL_HELP.get(self.key, "")

    def cells(self) -> list[str]:
        return [
            self.name,
            fmt_percent(self.iou, ""),  # the column headers carry the units
            fmt_percent(self.f1, ""),
            fmt_params(self.params),
            fmt_speed(self.mpx_per_s, ""),
        ]


COLUMNS = ["Model", "IoU %", "F1 %", "Params", "Mpx/s"]


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def fmt_percent(value: Optional[float], unit: str = " %") -> str:
    return "–" if value is None else f"{100.0 * value:.1f}{unit}"


def fmt_params(value: Optional[float]) -> str:
    if value is None:
        return "–"
    if value >= 1e6:
        return f"{value / 1e6:.1f} M"
    if value >= 1e3:
        return f"{value / 1e3:.0f} k"
    return f"{value:.0f}"


def fmt_speed(value: Optional[float], unit: str = " Mpx/s") -> str:
    if value is None:
        return "–"
    return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"


def read_metrics(path: str) -> dict[str, Any]:
    """metrics.json as a dict ({} when missing or unreadable: the table then stays empty)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def result_rows(metrics: dict[str, Any]) -> list[ResultRow]:
    """Rows for every model in ``metrics["models"]``: known names in report order, the student last."""
    models = metrics.get("models") or {}
    if not isinstance(models, dict):
        return []
    order = [k for k in MODEL_NAMES if k in models] + sorted(k for k in models if k not in MODEL_NAMES)
    rows = []
    for key in order:
        values = models[key] if isinstance(models[key], dict) else {}
        rows.append(
            ResultRow(
                key,
                model_label(key),
                _number(values.get("iou")),
                _number(values.get("f1")),
                _number(values.get("params")),
                _number(values.get("mpx_per_s")),
            )
        )
    return rows


def comparison(rows: list[ResultRow]) -> str:
    """One sentence putting the student next to the largest teacher ('' when either is missing)."""
    student = next((row for row in rows if row.is_student), None)
    teachers = [row for row in rows if row.key.startswith("teacher") and row.params]
    if student is None or not student.params or not teachers:
        return ""
    biggest = max(teachers, key=lambda row: row.params or 0.0)
    ratio = (biggest.params or 0.0) / student.params
    best = max((row for row in teachers if row.iou is not None), key=lambda row: row.iou or 0.0, default=None)
    text = f"{ratio:.1f}× fewer parameters than the teachers"
    if best is not None:
        text += f"; best teacher IoU {fmt_percent(best.iou)} ({best.name})"
    return text


def report_for_panel(markdown: str) -> str:
    """The report without its tables: the dock's table shows them and a narrow panel would crush them."""
    lines, in_table, out = markdown.splitlines(), False, []
    for line in lines:
        if line.lstrip().startswith("|"):
            if not in_table:
                out.append("*The full table is in the report window (Report button).*")
            in_table = True
            continue
        in_table = False
        if line.startswith("#"):  # headings one size down: the panel is small
            line = "#" * min(line.count("#", 0, 6) + 2, 6) + " " + line.lstrip("#").strip()
        out.append(line)
    return "\n".join(out)


@dataclass
class RunFolder:
    """Paths of a run folder's products; each is None when the file does not exist (yet)."""

    path: str

    def _file(self, name: str) -> Optional[str]:
        candidate = os.path.join(self.path, name)
        return candidate if os.path.isfile(candidate) else None

    @property
    def onnx(self) -> Optional[str]:
        """The student to segment with: the INT8 copy when training kept one (faster on CPUs, within 1 IoU
        point of fp32), else the fp32 model."""
        return self._file("student.int8.onnx") or self._file("student.onnx")

    @property
    def metrics(self) -> Optional[str]:
        return self._file("metrics.json")

    @property
    def report(self) -> Optional[str]:
        return self._file("report.md")

    @property
    def config(self) -> Optional[str]:
        return self._file("config.json")

    def holds_run(self) -> bool:
        """True when the folder exists and has anything in it: it is never reused for a new run."""
        return os.path.isdir(self.path) and any(os.scandir(self.path))

    def finished(self) -> bool:
        return self.onnx is not None and self.metrics is not None
