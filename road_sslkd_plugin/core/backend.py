"""Finding the backend interpreter, and "Set up backend": a venv in the profile folder with pip.

Search order: ``ROAD_SSLKD_BACKEND_PYTHON``, the user's setting (``road_sslkd/backend/python``), the
project's ``.venv-backend`` next to the plugin folder in a development checkout, then the venv the plugin
manages in the user's profile folder (``<QGIS settings dir>/road_sslkd/venv``). A candidate counts once
``import road_sslkd`` works in it and no set-up of its venv was cut short: the plugin never imports the
backend (nor torch) itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import QObject, QProcess, QProcessEnvironment, pyqtSignal

from . import settings
from .protocol import clean_environment

PLUGIN_DIR = Path(__file__).resolve().parent.parent
WINDOWS = sys.platform.startswith("win")
PROBE_CODE = "import road_sslkd, sys; sys.stdout.write(road_sslkd.__version__)"
BACKEND_PYTHON_VARIABLE = "ROAD_SSLKD_BACKEND_PYTHON"  # a backend interpreter for headless use
# A Python that can make the backend's venv: it runs, has venv, and is one the backend supports.
BASE_PYTHON_CHECK = "import sys, venv; sys.exit(sys.version_info < (3, 9))"
# What pip prints when it cannot reach an index: offline, DNS, proxy, firewall, TLS interception.
NETWORK_ERRORS = (
    "NewConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
    "SSLError",
    "Temporary failure in name resolution",
    "getaddrinfo failed",
)
OFFLINE_HINT = (
    "pip could not reach the package index: no internet connection, or a proxy or firewall in the way. "
    "Connect and set up again, or give a proxy or mirror in Extra pip arguments "
    "(--proxy http://host:port, or --index-url https://mirror/simple)."
)
CANCELLED = "Set-up cancelled: the unfinished environment is not used, and the next set-up rebuilds it."


def venv_python(venv: Path) -> Path:
    """The interpreter inside a venv folder."""
    return venv / ("Scripts/python.exe" if WINDOWS else "bin/python")


def managed_venv_dir() -> Path:
    """The venv "Set up backend" creates: in the user's QGIS profile, so it survives plugin updates."""
    return Path(QgsApplication.qgisSettingsDirPath()) / "road_sslkd" / "venv"


def setup_marker(venv: Path) -> Path:
    """Lies next to ``venv`` while "Set up backend" changes it and stays when that was cut short."""
    return venv.parent / f"{venv.name}.unfinished"


def checkout_venv_dir(plugin_dir: Path = PLUGIN_DIR) -> Path:
    """``.venv-backend`` of a development checkout (the plugin folder's parent is the repository)."""
    return plugin_dir.parent / ".venv-backend"


def backend_source_dir(plugin_dir: Path = PLUGIN_DIR) -> Optional[Path]:
    """The folder holding backend/pyproject.toml: bundled in the plugin zip, else the checkout's."""
    for candidate in (plugin_dir / "backend", plugin_dir.parent / "backend"):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return None


def plugin_version(plugin_dir: Path = PLUGIN_DIR) -> str:
    """``version=`` of metadata.txt (inside the zip, or at the checkout's root)."""
    for candidate in (plugin_dir / "metadata.txt", plugin_dir.parent / "metadata.txt"):
        try:
            for line in candidate.read_text(encoding="utf-8").splitlines():
                if line.strip().startswith("version="):
                    return line.split("=", 1)[1].strip()
        except OSError:
            continue
    return ""


def backend_command(python: str) -> list[str]:
    """How to run ``road-sslkd`` with this interpreter: its console script, else ``python -m``."""
    script = Path(python).parent / ("road-sslkd.exe" if WINDOWS else "road-sslkd")
    if script.is_file():
        return [str(script)]
    return [python, "-m", "road_sslkd.cli"]


def hidden_window_flags() -> int:
    """No console window flashing up on Windows for background processes."""
    return getattr(subprocess, "CREATE_NO_WINDOW", 0) if WINDOWS else 0


@dataclass
class Candidate:
    python: str
    source: str  # "setting", "checkout", "profile"


@dataclass
class BackendStatus:
    """Result of the search: ``python`` and ``version`` when found; ``notes`` say what was tried."""

    python: Optional[str] = None
    source: str = ""
    version: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.python is not None

    def command(self) -> list[str]:
        if self.python is None:
            raise RuntimeError("no backend found")
        return backend_command(self.python)


SOURCE_NAMES = {
    "environment": f"interpreter from {BACKEND_PYTHON_VARIABLE}",
    "setting": "interpreter from settings",
    "checkout": ".venv-backend",
    "profile": "managed venv",
}


class BackendLocator:
    """Searches the three places in order; tests point ``plugin_dir`` and ``profile_venv`` elsewhere."""

    def __init__(
        self,
        plugin_dir: Path = PLUGIN_DIR,
        profile_venv: Optional[Path] = None,
        use_setting: bool = True,
    ) -> None:
        self.plugin_dir = Path(plugin_dir)
        self.profile_venv = Path(profile_venv) if profile_venv else managed_venv_dir()
        self.use_setting = use_setting

    def candidates(self) -> list[Candidate]:
        found = []
        # The variable serves headless servers (qgis_process), where no dock can store the setting.
        for python, source in (
            (os.environ.get(BACKEND_PYTHON_VARIABLE, "") if self.use_setting else "", "environment"),
            (str(settings.user_value(settings.BACKEND_PYTHON_KEY, "") or "") if self.use_setting else "", "setting"),
        ):
            if python:
                found.append(Candidate(python, source))
        found.append(Candidate(str(venv_python(checkout_venv_dir(self.plugin_dir))), "checkout"))
        found.append(Candidate(str(venv_python(self.profile_venv)), "profile"))
        return found

    def find(self) -> BackendStatus:
        status = BackendStatus()
        for candidate in self.candidates():
            venv = Path(candidate.python).parent.parent
            if candidate.source not in ("environment", "setting") and not venv.is_dir():
                continue  # absent default places are normal, not worth a note
            if setup_marker(venv).exists():  # pip was killed mid-way: road_sslkd may import, torch be half there
                version, problem = "", "its set-up did not finish: Set up backend again"
            else:
                version, problem = probe(candidate.python)
            if problem:
                status.notes.append(f"{SOURCE_NAMES[candidate.source]} ({candidate.python}): {problem}")
                continue
            status.python, status.source, status.version = candidate.python, candidate.source, version
            return status
        return status


def probe(python: str, timeout: float = 60.0) -> tuple[str, str]:
    """(backend version, "") when ``import road_sslkd`` works with ``python``, else ("", problem)."""
    if not Path(python).is_file():
        return "", "no such file"
    try:
        result = subprocess.run(
            [python, "-c", PROBE_CODE],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=clean_environment(os.environ),
            creationflags=hidden_window_flags(),
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return "", str(exc)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["import road_sslkd failed"])[-1]
        return "", last
    return result.stdout.strip(), ""


def python_runs(python: str) -> bool:
    """``python`` starts, has venv, and is 3.9 or newer (a venv's python whose base is gone does not start)."""
    try:
        result = subprocess.run(
            [python, "-c", BASE_PYTHON_CHECK],
            capture_output=True,
            timeout=60,
            env=clean_environment(os.environ),
            creationflags=hidden_window_flags(),
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def base_python_candidates() -> list[str]:
    """The interpreter that creates the managed venv, as a list of one (none when nothing runs).

    Tried in order: the setting, QGIS's own Python, then PATH. Each is run, so a bundled interpreter that
    cannot run outside QGIS (recent macOS bundles) is passed over; the search stops at the first that
    runs (on macOS, running /usr/bin/python3 without the developer tools opens their installer).
    """
    names = []
    configured = str(settings.user_value(settings.BASE_PYTHON_KEY, "") or "")
    if configured:
        names.append(configured)
    # Inside QGIS sys.executable is often the qgis binary itself, so look next to the prefix as well,
    # and in Contents/MacOS/bin next to the QGIS.app binary.
    names += [
        sys.executable,
        getattr(sys, "_base_executable", ""),
        os.path.join(sys.exec_prefix, "python.exe" if WINDOWS else "bin/python3"),
        os.path.join(sys.base_exec_prefix, "python.exe" if WINDOWS else "bin/python3"),
        os.path.join(os.path.dirname(sys.executable), "bin", "python3"),
        shutil.which("python3") or "",
        shutil.which("python") or "",
    ]
    for name in names:
        if name and Path(name).is_file() and Path(name).name.lower().startswith("python") and python_runs(name):
            return [name]
    return []


def has_nvidia_gpu() -> bool:
    """A hint for the CUDA flavour of onnxruntime: nvidia-smi is on PATH."""
    return shutil.which("nvidia-smi") is not None


class BackendInstaller(QObject):
    """Creates the managed venv and pip-installs the backend into it, one QProcess step after another.

    Signals: ``step(text)`` for the progress label, ``log(line)`` for every output line,
    ``finished(ok, message)`` at the end; on failure the message's first line says what happened (and the
    fix, where pip could not reach its index) and the rest holds the tail of the output.

    ``setup_marker(venv_dir)`` exists from ``start()`` until pip ends by itself (pip undoes a failed
    install): after a cancel, a crash or a failed ``venv`` step the locator skips the venv and the next
    set-up rebuilds it from scratch.
    """

    step = pyqtSignal(str)
    log = pyqtSignal(str)
    finished = pyqtSignal(bool, str)

    def __init__(
        self,
        venv_dir: Path,
        source_dir: Path,
        base_python: str,
        gpu: bool = False,
        pip_args: Optional[list[str]] = None,
        parent: Optional[QObject] = None,
    ) -> None:
        super().__init__(parent)
        self.venv_dir = Path(venv_dir)
        self.source_dir = Path(source_dir)
        self.base_python = base_python
        self.extra = "gpu" if gpu else "cpu"
        self.pip_args = list(pip_args or [])
        self.tail: deque[str] = deque(maxlen=40)
        self.process: Optional[QProcess] = None
        self._steps: list[tuple[str, str, list[str]]] = []
        self._buffer = b""
        self._cancelled = False
        self._offline = False

    def plan(self) -> list[tuple[str, str, list[str]]]:
        """(label, program, arguments) of each step, pip last; a venv that works and is whole is reused."""
        python = str(venv_python(self.venv_dir))
        steps = []
        if setup_marker(self.venv_dir).exists() or not python_runs(python):
            # --clear: otherwise venv keeps a python whose base is gone, and a killed pip's half packages
            steps.append(
                ("Creating the virtual environment", self.base_python, ["-m", "venv", "--clear", str(self.venv_dir)])
            )
        steps.append(
            (
                "Installing the backend with pip (PyTorch is large: this can take a while)",
                python,
                [
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "--progress-bar",
                    "off",
                    *self.pip_args,
                    f"{self.source_dir}[{self.extra}]",
                ],
            )
        )
        return steps

    def start(self) -> None:
        """Run the plan; ``finished`` tells the outcome. Refused while a set-up is running."""
        if self.is_running():
            raise RuntimeError("the backend set-up is already running")
        self._steps = self.plan()
        self._cancelled = self._offline = False
        marker = setup_marker(self.venv_dir)
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError as exc:
            self._steps = []
            self.finished.emit(False, f"Cannot write in {marker.parent}: {exc}")
            return
        self._next()

    def is_running(self) -> bool:
        return self.process is not None and self.process.state() != QProcess.ProcessState.NotRunning

    def cancel(self) -> None:
        """Kill the running step; ``finished(False, CANCELLED)`` follows."""
        self._steps = []
        if self.is_running():
            self._cancelled = True
            self.process.kill()

    def _next(self) -> None:
        if not self._steps:
            version, problem = probe(str(venv_python(self.venv_dir)))
            if problem:
                self.finished.emit(False, f"The backend was installed but does not import: {problem}")
            else:
                self.finished.emit(True, f"Backend {version} installed in {self.venv_dir}")
            return
        label, program, args = self._steps.pop(0)
        self.step.emit(label)
        self.log.emit("$ " + " ".join([program, *args]))
        self.tail.clear()
        process = QProcess(self)
        environment = QProcessEnvironment()
        for key, value in clean_environment(os.environ).items():
            environment.insert(key, value)
        process.setProcessEnvironment(environment)
        process.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        process.readyReadStandardOutput.connect(self._read)
        process.finished.connect(self._step_finished)
        process.errorOccurred.connect(self._error)
        self.process = process
        process.start(program, args)

    def _read(self) -> None:
        self._buffer += bytes(self.process.readAllStandardOutput())
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            self.tail.append(line)
            self.log.emit(line)
            # Remembered here: pip's connection errors scroll out of the tail before it gives up.
            self._offline = self._offline or any(error in line for error in NETWORK_ERRORS)
            if line.startswith(("Collecting ", "Installing collected packages", "Building wheel")):
                self.step.emit(line[:90])

    def _error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            self._steps = []
            self.finished.emit(False, f"Could not start {self.process.program()}: {self.process.errorString()}")

    def _step_finished(self, exit_code: int, exit_status: QProcess.ExitStatus) -> None:
        self._read()
        if self._cancelled:
            self.finished.emit(False, CANCELLED)
            return
        normal = exit_status == QProcess.ExitStatus.NormalExit
        if normal and not self._steps:  # pip ended by itself: installed, or rolled back what it began
            setup_marker(self.venv_dir).unlink(missing_ok=True)
        if not normal or exit_code != 0:
            self._steps = []
            failed = f"{Path(self.process.program()).name} failed (exit code {exit_code}):"
            summary = OFFLINE_HINT if self._offline else failed
            self.finished.emit(False, summary + "\n" + "\n".join(self.tail))
            return
        self._next()
