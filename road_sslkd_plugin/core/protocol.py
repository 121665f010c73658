"""The plugin <-> backend subprocess protocol as pure functions: no Qt, no QGIS, testable on its own.

Argument lists for ``road-sslkd train``, the cleaned environment the backend runs in, JSON-lines event
parsing and the reading of an exit code (see ../shared/DESIGN.md, "The subprocess protocol").
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_CANCELLED = 143  # 128 + SIGTERM: the backend checkpointed and stopped
SIGKILL = 9

PRESETS = ("tiny", "cpu", "gpu")
DEVICES = ("auto", "cpu", "cuda")

# Every stage ``--stages`` accepts, in the order the backend runs them; the baselines are the three extra
# students the benchmark compares. Progress events also name "evaluate" (after each model, with a "model"
# key) and "export".
TRAIN_STAGES = (
    "teacher_a",
    "teacher_b",
    "teachers_ssl",
    "student_supervised",
    "student_ssl",
    "student_kd",
    "student_sslkd",
)
STAGE_LABELS = {
    "teacher_a": "Teacher A",
    "teacher_b": "Teacher B",
    "teachers_ssl": "Cross-model SSL",
    "student_sslkd": "Student SSLKD",
    "student_supervised": "Student (supervised)",
    "student_ssl": "Student (SSL)",
    "student_kd": "Student (KD)",
    "evaluate": "Evaluate",
    "export": "Export",
}

# Environment variables that belong to QGIS's own Python or GDAL/PROJ and would break the backend venv
# (a wrong numpy on PYTHONPATH, rasterio's bundled PROJ reading QGIS's proj.db of another version).
_DROPPED_VARIABLES = {
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONUSERBASE",
    "PYTHONEXECUTABLE",
    "PYTHONSAFEPATH",
    "VIRTUAL_ENV",
    "__PYVENV_LAUNCHER__",
    "GDAL_DATA",
    "GDAL_DRIVER_PATH",
    "PROJ_LIB",
    "PROJ_DATA",
    "QT_PLUGIN_PATH",
}
_DROPPED_PREFIXES = ("QGIS_", "PYQGIS_", "QT_QPA_")
_PATH_LISTS = ("PATH", "LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "DYLD_FALLBACK_LIBRARY_PATH")
# Prefixes shared with the whole system: stripping them from PATH would break everything.
_SYSTEM_PREFIXES = {"/", "/usr", "/usr/local", "/opt/homebrew"}


STAGE_SHORT = {
    "teacher_a": "Teacher A",
    "teacher_b": "Teacher B",
    "teachers_ssl": "SSL",
    "student_supervised": "Sup.",
    "student_ssl": "Stud. SSL",
    "student_kd": "KD",
    "student_sslkd": "Student",
    "evaluate": "Evaluate",
    "export": "Export",
}
# The stage strip of a default run: each model is evaluated inside its own stage, so no "evaluate" chip.
RUN_STAGES = ("teacher_a", "teacher_b", "teachers_ssl", "student_sslkd", "export")


def short_stage_label(stage: Optional[str]) -> str:
    """Label that fits a chip or a chart column ("teachers_ssl" -> "SSL")."""
    return STAGE_SHORT.get(stage or "", stage_label(stage))


def run_stages(stages: Sequence[str] = ()) -> list[str]:
    """Stages a run goes through, in order: the ``--stages`` chosen (or the default) then the export."""
    return [*(stages or RUN_STAGES[:-1]), "export"]


def stage_label(stage: Optional[str]) -> str:
    """Readable name of a backend stage ("teachers_ssl" -> "Cross-model SSL")."""
    if not stage:
        return ""
    if stage.startswith("pretrain_"):  # one per encoder ("pretrain_resnet34"), weights "pretrain"
        return f"Pretraining {stage.removeprefix('pretrain_')}"
    return STAGE_LABELS.get(stage, stage.replace("_", " ").capitalize())


def qgis_python_prefixes() -> list[str]:
    """Folders of the Python running QGIS (or the test venv) that must not leak into the backend."""
    prefixes = {os.path.normpath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix) if p}
    return sorted(p for p in prefixes if p not in _SYSTEM_PREFIXES)


def _inside(path: str, prefixes: Sequence[str]) -> bool:
    norm = os.path.normcase(os.path.normpath(path))
    for prefix in prefixes:
        pre = os.path.normcase(os.path.normpath(prefix))
        if norm == pre or norm.startswith(pre + os.sep):
            return True
    return False


def clean_environment(env: Mapping[str, str], qgis_prefixes: Optional[Sequence[str]] = None) -> dict[str, str]:
    """Copy of ``env`` safe for the backend venv: no PYTHON*/QGIS*/GDAL/PROJ variables of QGIS.

    Entries of PATH-like variables inside QGIS's Python prefix are removed, other variables whose value
    points into it are dropped; output is made unbuffered UTF-8 so events arrive line by line.
    """
    prefixes = list(qgis_python_prefixes() if qgis_prefixes is None else qgis_prefixes)
    clean: dict[str, str] = {}
    for key, value in env.items():
        upper = key.upper()
        if upper in _DROPPED_VARIABLES or upper.startswith(_DROPPED_PREFIXES):
            continue
        if upper in _PATH_LISTS:
            kept = [p for p in value.split(os.pathsep) if p and not _inside(p, prefixes)]
            if kept:
                clean[key] = os.pathsep.join(kept)
            continue
        if prefixes and value and os.path.isabs(value) and _inside(value, prefixes):
            continue
        clean[key] = value
    clean["PYTHONUNBUFFERED"] = "1"
    clean["PYTHONIOENCODING"] = "utf-8"
    clean["PYTHONNOUSERSITE"] = "1"  # ~/.local packages of the user's Python must not shadow the venv's
    return clean


@dataclass
class TrainRequest:
    """Everything a training run needs, as plain values copied out of QGIS layers before it starts."""

    run_dir: str
    labelled: list[tuple[str, str]]
    unlabelled: list[str] = field(default_factory=list)
    test: list[tuple[str, str]] = field(default_factory=list)
    preset: str = "tiny"
    label_width: Optional[float] = None
    steps_scale: float = 1.0
    device: str = "auto"
    seed: Optional[int] = None
    config: Optional[str] = None
    stages: list[str] = field(default_factory=list)
    weights: Optional[str] = None
    bands: Optional[str] = None
    extra_args: list[str] = field(default_factory=list)

    def to_args(self) -> list[str]:
        """Arguments after ``road-sslkd`` (an argument list: never joined into a shell string)."""
        args = ["train", "--out", self.run_dir, "--preset", self.preset]
        args += ["--labelled", *map(pair_arg, self.labelled)]
        if self.unlabelled:
            args += ["--unlabelled", *self.unlabelled]
        if self.test:
            args += ["--test", *map(pair_arg, self.test)]
        if self.label_width is not None:
            args += ["--label-width", _number(self.label_width)]
        if abs(self.steps_scale - 1.0) > 1e-9:
            args += ["--steps-scale", _number(self.steps_scale)]
        if self.device != "auto":
            args += ["--device", self.device]
        if self.seed is not None:
            args += ["--seed", str(self.seed)]
        if self.config:
            args += ["--config", self.config]
        if self.stages:
            args += ["--stages", ",".join(self.stages)]
        if self.weights:
            args += ["--weights", self.weights]
        if self.bands:
            args += ["--bands", self.bands]
        return args + list(self.extra_args)


def pair_arg(pair: tuple[str, str]) -> str:
    """``IMAGE::LABEL`` for ``--labelled`` and ``--test``: the backend splits at "::" first, so paths with ":"
    (``C:\\``, ``a:b.tif``) stay whole."""
    return "::".join(pair)


def resume_args(run_dir: str) -> list[str]:
    """Arguments that continue a cancelled run from its last checkpoint."""
    return ["train", "--resume", run_dir]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse_event_line(line: str) -> Optional[dict[str, Any]]:
    """The event of one stdout line, or None when the line is not a JSON object with an ``event`` key."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if isinstance(data, dict) and isinstance(data.get("event"), str):
        return data
    return None


@dataclass
class RunOutcome:
    """How a backend run ended, in words the dock can show as they are."""

    status: str  # "done", "cancelled", "user_error", "killed", "crash", "failed_to_start"
    message: str
    hint: str = ""
    exit_code: Optional[int] = None
    stderr_tail: list[str] = field(default_factory=list)
    run_dir: Optional[str] = None
    artifacts: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "done"

    @property
    def resumable(self) -> bool:
        return self.status == "cancelled" and bool(self.run_dir)

    def details(self) -> str:
        """Exit code and stderr tail, for the log and the error message."""
        parts = []
        if self.exit_code is not None:
            parts.append(f"exit code {self.exit_code}")
        if self.stderr_tail:
            parts.append("last lines of the backend log:\n" + "\n".join(self.stderr_tail))
        return "\n".join(parts)


def classify_exit(
    exit_code: int,
    crashed: bool,
    cancel_requested: bool,
    error_event: Optional[Mapping[str, Any]] = None,
    done_event: Optional[Mapping[str, Any]] = None,
    stderr_tail: Sequence[str] = (),
    run_dir: Optional[str] = None,
) -> RunOutcome:
    """Read the end of a run. ``crashed`` means killed by a signal; then ``exit_code`` is the signal."""
    tail = list(stderr_tail)
    error_event = error_event or {}
    message = str(error_event.get("message") or "")
    hint = str(error_event.get("hint") or "")

    def outcome(status: str, text: str, hint_text: str = "") -> RunOutcome:
        return RunOutcome(status, text, hint_text, exit_code, tail, run_dir)

    if crashed:
        if cancel_requested:
            return outcome(
                "cancelled",
                "Training stopped.",
                "Resume continues from the last checkpoint the backend wrote.",
            )
        if exit_code == SIGKILL:
            return outcome(
                "killed",
                "The backend was killed by the system: probably out of memory.",
                "Try a smaller preset (tiny or cpu), fewer or smaller images, or close other programs.",
            )
        return outcome("crash", f"The backend crashed (signal {exit_code}).", "The log below has the details.")
    if exit_code == EXIT_OK:
        if done_event is not None:
            return outcome("done", "Training finished.")
        return outcome("done", "Training finished (the backend reported no summary).")
    if exit_code == EXIT_CANCELLED or error_event.get("cancelled"):
        return outcome("cancelled", "Training cancelled; the run can be resumed.", hint or "Click Resume.")
    if exit_code == EXIT_USER_ERROR:
        return outcome("user_error", message or "The backend rejected the input.", hint)
    if exit_code in (128 + SIGKILL, -SIGKILL):  # shell-style or Python-style report of a SIGKILL
        return outcome(
            "killed",
            "The backend was killed by the system: probably out of memory.",
            "Try a smaller preset (tiny or cpu), fewer or smaller images, or close other programs.",
        )
    return outcome("crash", message or f"The backend crashed (exit code {exit_code}).", hint)


def overall_fraction(
    stage: Optional[str], step: float, total: float, stages: Sequence[str] = RUN_STAGES
) -> Optional[float]:
    """Rough progress of the whole run in 0..1 (stages weigh equally); None for a stage not in ``stages``."""
    if not stage or stage not in stages:
        return None
    within = min(max(step / total, 0.0), 1.0) if total else 0.0
    return (list(stages).index(stage) + within) / len(stages)


def format_duration(seconds: float) -> str:
    """'2 min 05 s' style text."""
    seconds = int(round(max(seconds, 0)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_eta(seconds: Optional[float]) -> str:
    """'about 3 min left' style text, or '' when unknown."""
    if seconds is None or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s left"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s left" if minutes < 10 else f"{minutes} min left"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min left"
