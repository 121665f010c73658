""""Set up backend" with real venvs, real pip and real sockets, on a stand-in backend of a few lines.

The stand-in has an in-tree build backend and no build requirements, so pip builds it without a network;
its one dependency is what pip has to download, from an index the test controls.
"""

from __future__ import annotations

import select
import socket
import sys
from pathlib import Path

import pytest

from conftest import wait_until
from road_sslkd_plugin.core import settings
from road_sslkd_plugin.core.backend import (
    CANCELLED,
    OFFLINE_HINT,
    BackendInstaller,
    BackendLocator,
    base_python_candidates,
    setup_marker,
    venv_python,
)

BUILD_BACKEND = '''
import os, zipfile

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = "road_sslkd-" + open("VERSION").read().strip()
    files = {
        "road_sslkd/__init__.py": open("road_sslkd/__init__.py").read(),
        name + ".dist-info/METADATA": open("METADATA").read(),
        name + ".dist-info/WHEEL": "Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
    }
    record = name + ".dist-info/RECORD"
    with zipfile.ZipFile(os.path.join(wheel_directory, name + "-py3-none-any.whl"), "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)
        wheel.writestr(record, "".join(path + ",,\\n" for path in [*files, record]))
    return name + "-py3-none-any.whl"
'''


def write_backend(source: Path, version: str, dependency: str = "") -> Path:
    """A backend source folder that pip installs as road-sslkd ``version``, needing ``dependency``."""
    (source / "road_sslkd").mkdir(parents=True, exist_ok=True)
    (source / "road_sslkd" / "__init__.py").write_text(f'__version__ = "{version}"\n')
    (source / "VERSION").write_text(version)
    requires = f"Requires-Dist: {dependency}\n" if dependency else ""
    (source / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: road-sslkd\nVersion: {version}\nProvides-Extra: cpu\n{requires}"
    )
    (source / "wheel_only.py").write_text(BUILD_BACKEND)
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "wheel_only"\nbackend-path = ["."]\n'
    )
    return source


pytestmark = pytest.mark.usefixtures("own_pip")  # conftest: pip sees no configuration of this machine


def run(installer: BackendInstaller) -> tuple[bool, str]:
    """Start ``installer`` and wait for its ``finished``."""
    outcome = []
    installer.finished.connect(lambda ok, message: outcome.append((ok, message)))
    installer.start()
    assert wait_until(lambda: outcome, 300), "the set-up did not finish"
    return outcome[0]


def test_a_venv_whose_python_is_gone_is_noted_and_rebuilt(tmp_path):
    """Its base Python was removed (a QGIS or Python upgrade): Set up backend makes it work again."""
    venv = tmp_path / "QGIS profile" / "road sslkd" / "venv"
    venv_python(venv).parent.mkdir(parents=True)
    venv_python(venv).symlink_to(tmp_path / "uninstalled" / "python3")
    locator = BackendLocator(plugin_dir=tmp_path / "plugins" / "road_sslkd_plugin", profile_venv=venv)
    status = locator.find()
    assert not status.found and str(venv_python(venv)) in status.notes[0]

    source = write_backend(tmp_path / "plugin with spaces" / "backend", "9.9.9")
    ok, message = run(BackendInstaller(venv, source, sys.executable, pip_args=["--no-index"]))
    assert ok, message
    status = locator.find()
    assert status.found and status.source == "profile" and status.version == "9.9.9"
    assert not setup_marker(venv).exists()


def test_an_update_offline_keeps_the_backend_and_a_cancelled_one_does_not(tmp_path):
    venv = tmp_path / "venv"
    source = write_backend(tmp_path / "backend", "1.0")
    locator = BackendLocator(plugin_dir=tmp_path / "plugins" / "road_sslkd_plugin", profile_venv=venv)
    assert run(BackendInstaller(venv, source, sys.executable, pip_args=["--no-index"]))[0]
    assert locator.find().version == "1.0"

    write_backend(source, "2.0", dependency="torch")
    with socket.socket() as closed:  # a port nobody listens on: connection refused, as offline
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    offline = BackendInstaller(venv, source, sys.executable, pip_args=["--index-url", f"http://127.0.0.1:{port}"])
    ok, message = run(offline)
    assert not ok and message.splitlines()[0] == OFFLINE_HINT, message
    assert "Extra pip arguments" in OFFLINE_HINT
    assert locator.find().version == "1.0"  # pip undid nothing it had not done: the backend still works

    # An index that accepts the connection and never answers: pip waits there until it is cancelled.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        installer = BackendInstaller(
            venv, source, sys.executable, pip_args=["--index-url", f"http://127.0.0.1:{silent.getsockname()[1]}"]
        )
        outcome = []
        installer.finished.connect(lambda ok, message: outcome.append((ok, message)))
        installer.start()
        assert wait_until(lambda: select.select([silent], [], [], 0)[0], 120), "pip never asked the index"
        with pytest.raises(RuntimeError, match="already running"):
            installer.start()  # a second click
        installer.cancel()
        assert wait_until(lambda: outcome, 60)
    assert outcome == [(False, CANCELLED)] and not installer.is_running()
    status = locator.find()  # road_sslkd 1.0 still imports there, but pip was stopped half-way
    assert not status.found and "did not finish" in status.notes[0]
    first = BackendInstaller(venv, source, sys.executable).plan()[0]
    assert first[1:] == (sys.executable, ["-m", "venv", "--clear", str(venv)])


def test_the_base_python_is_one_that_runs(tmp_path):
    broken = tmp_path / "broken bundle" / "python3"
    broken.parent.mkdir()
    broken.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'encodings'\" >&2\nexit 1\n")
    broken.chmod(0o755)
    settings.set_user_value(settings.BASE_PYTHON_KEY, str(broken))
    assert base_python_candidates() == [sys.executable]  # passed over for the next: this test's Python
    chosen = tmp_path / "my tools" / "python3"
    chosen.parent.mkdir()
    chosen.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    chosen.chmod(0o755)
    settings.set_user_value(settings.BASE_PYTHON_KEY, str(chosen))
    assert base_python_candidates() == [str(chosen)]  # the user's choice comes first
