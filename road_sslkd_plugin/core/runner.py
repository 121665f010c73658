"""Running ``road-sslkd`` as a QProcess: JSON-lines events on stdout become Qt signals.

QProcess works asynchronously on the main thread's event loop, so the UI never blocks and no QGIS
object is touched anywhere else; the arguments are plain strings built before the start. A
QgsProxyProgressTask mirrors the progress in QGIS's task manager (status bar) while the dock is hidden.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Optional

from qgis.core import QgsApplication, QgsProxyProgressTask
from qgis.PyQt.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, pyqtSignal

from .protocol import RunOutcome, classify_exit, clean_environment, overall_fraction, parse_event_line

CANCEL_GRACE_MS = 120_000  # time to write a checkpoint after SIGTERM before the process is killed
# QProcess.terminate() is SIGTERM on Unix, but on Windows a WM_CLOSE that a console program never sees, and
# PyQt cannot start the backend in its own process group for CTRL_BREAK: there Cancel stops it at once.
GRACEFUL_CANCEL = os.name != "nt"


class TrainingRunner(QObject):
    """One backend process at a time: ``backend_event`` per event, ``log`` per stderr line, ``finished(RunOutcome)``."""

    backend_event = pyqtSignal(dict)
    log = pyqtSignal(str, str)  # (line, level: "info", "warning", "error", "command")
    finished = pyqtSignal(object)

    def __init__(
        self, parent: Optional[QObject] = None, task_manager: bool = True, cancel_grace_ms: int = CANCEL_GRACE_MS
    ) -> None:
        super().__init__(parent)
        self.process: Optional[QProcess] = None
        self.use_task_manager = task_manager
        self.task: Optional[QgsProxyProgressTask] = None
        self.run_dir: Optional[str] = None
        # One timer, stopped whenever a process ends or starts: a pending kill never reaches a later run.
        self._kill_timer = QTimer(self)
        self._kill_timer.setSingleShot(True)
        self._kill_timer.setInterval(cancel_grace_ms)
        self._kill_timer.timeout.connect(self._kill_if_running)
        self._reset()

    def _reset(self) -> None:
        self._kill_timer.stop()
        self._stdout = b""
        self._stderr = b""
        self.stderr_tail: deque[str] = deque(maxlen=30)
        self.cancel_requested = False
        self.error_event: Optional[dict[str, Any]] = None
        self.done_event: Optional[dict[str, Any]] = None
        self.artifacts: dict[str, str] = {}

    def is_running(self) -> bool:
        return self.process is not None and self.process.state() != QProcess.ProcessState.NotRunning

    def start(self, command: list[str], args: list[str], run_dir: str, description: str = "Road SSLKD") -> None:
        """Start ``command + args`` (argument list, cleaned environment); ``run_dir`` is the run folder."""
        if self.is_running():
            raise RuntimeError("a backend process is already running")
        self._reset()
        self.run_dir = run_dir
        process = QProcess(self)
        environment = QProcessEnvironment()
        for key, value in clean_environment(os.environ).items():
            environment.insert(key, value)
        process.setProcessEnvironment(environment)
        work_dir = os.path.dirname(os.path.abspath(run_dir))
        if os.path.isdir(work_dir):
            process.setWorkingDirectory(work_dir)
        process.readyReadStandardOutput.connect(self._read_stdout)
        process.readyReadStandardError.connect(self._read_stderr)
        process.finished.connect(self._finished)
        process.errorOccurred.connect(self._error)
        self.process = process
        self.log.emit(" ".join(_quote(part) for part in [*command, *args]), "command")
        if self.use_task_manager:
            self.task = QgsProxyProgressTask(description)
            if hasattr(self.task, "canceled"):  # QGIS >= 3.26: Cancel in the task manager stops the run
                self.task.canceled.connect(self.cancel)
            QgsApplication.taskManager().addTask(self.task)
        process.start(command[0], [*command[1:], *args])

    def cancel(self) -> None:
        """SIGTERM (the backend checkpoints, exits 143); killed if it has not stopped after a grace time."""
        if not self.is_running() or self.cancel_requested:
            return
        self.cancel_requested = True
        if not GRACEFUL_CANCEL:
            self.log.emit("Cancelling: stopping the backend; Resume continues from its last checkpoint.", "warning")
            self.process.kill()
            return
        self.log.emit("Cancelling: the backend writes a checkpoint, then stops…", "warning")
        self.process.terminate()
        self._kill_timer.start()

    def stop_and_wait(self, timeout_ms: int = 15_000) -> None:
        """For plugin unload: cancel, wait a bit for the checkpoint, then kill; nothing left running."""
        if self.is_running():
            self.cancel()
            if not self.process.waitForFinished(timeout_ms):
                self.process.kill()
                self.process.waitForFinished(5_000)
        self._finish_task(False)

    def _kill_if_running(self) -> None:
        if self.is_running() and self.cancel_requested:
            self.log.emit("The backend did not stop in time: killing it.", "error")
            self.process.kill()

    def _read_stdout(self) -> None:
        self._stdout += bytes(self.process.readAllStandardOutput())
        *lines, self._stdout = self._stdout.split(b"\n")
        for raw in lines:
            self._handle_stdout_line(raw.decode("utf-8", "replace"))

    def _handle_stdout_line(self, line: str) -> None:
        if not line.strip():
            return
        event = parse_event_line(line)
        if event is None:  # the protocol forbids it, but never lose what the backend said
            self.log.emit(line.rstrip(), "info")
            return
        kind = event["event"]
        if kind == "error":
            self.error_event = event
        elif kind == "done":
            self.done_event = event
        elif kind == "artifact" and event.get("kind") and event.get("path"):
            self.artifacts[str(event["kind"])] = str(event["path"])
        elif kind == "progress" and self.task is not None:
            fraction = overall_fraction(event.get("stage"), event.get("step") or 0, event.get("total") or 0)
            if fraction is not None:  # evaluations and unknown stages keep the last value
                self.task.setProxyProgress(100.0 * fraction)
        self.backend_event.emit(event)

    def _read_stderr(self) -> None:
        self._stderr += bytes(self.process.readAllStandardError())
        *lines, self._stderr = self._stderr.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.stderr_tail.append(line)
                level = (
                    "error"
                    if " ERROR " in line or "Traceback" in line
                    else ("warning" if " WARNING " in line else "info")
                )
                self.log.emit(line, level)

    def _error(self, error: QProcess.ProcessError) -> None:
        if error != QProcess.ProcessError.FailedToStart:
            return  # crashes arrive through finished()
        outcome = RunOutcome(
            "failed_to_start",
            f"Could not start the backend: {self.process.errorString()}",
            "Check the backend interpreter (Set up backend, or the road_sslkd/backend/python setting).",
            run_dir=self.run_dir,
        )
        self._finish_task(False)
        self.finished.emit(outcome)

    def _finished(self, exit_code: int, exit_status: QProcess.ExitStatus) -> None:
        self._kill_timer.stop()
        self._read_stdout()
        self._read_stderr()
        # A last line without a newline (a crash mid-write) still counts.
        self._stdout, rest_out = b"", self._stdout
        self._stderr, rest_err = b"", self._stderr
        if rest_out.strip():
            self._handle_stdout_line(rest_out.decode("utf-8", "replace"))
        if rest_err.strip():
            line = rest_err.decode("utf-8", "replace").rstrip()
            self.stderr_tail.append(line)
            self.log.emit(line, "info")
        crashed = exit_status == QProcess.ExitStatus.CrashExit
        outcome = classify_exit(
            exit_code,
            crashed,
            self.cancel_requested,
            self.error_event,
            self.done_event,
            list(self.stderr_tail),
            self.run_dir,
        )
        outcome.artifacts = dict(self.artifacts)
        self._finish_task(outcome.ok)
        self.finished.emit(outcome)

    def _finish_task(self, ok: bool) -> None:
        if self.task is not None:
            self.task.finalize(ok)
            self.task = None


def _quote(part: str) -> str:
    """Readable command line for the log only (the process gets the argument list)."""
    return f'"{part}"' if (" " in part or not part) else part
