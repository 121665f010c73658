"""Shared fixtures: a small synthetic dataset (generated, never real data) and the CLI as a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from road_sslkd.demo_data import write_demo_dataset

CLI = [sys.executable, "-m", "road_sslkd.cli"]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """SYNTHETIC scenes: 2 labelled, 2 unlabelled, 1 test, 96 px."""
    folder = tmp_path_factory.mktemp("synthetic")
    write_demo_dataset(folder, labelled=2, unlabelled=2, test=1, size=96, seed=3)
    return folder


def run_cli(*args: str, timeout: float = 300) -> tuple[int, list[dict], str]:
    """Run `road-sslkd ARGS`; every stdout line must be a JSON event. Returns (code, events, stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert all("event" in e for e in events)
    return proc.returncode, events, proc.stderr


@pytest.fixture
def run_main(capsys):
    """`road-sslkd ARGS` in this process (fast; the same code path as the console script)."""
    from road_sslkd import cli

    def run(*args: str) -> tuple[int, list[dict]]:
        capsys.readouterr()
        code = cli.main(list(args))
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert all("event" in e for e in events)
        return code, events

    return run


def errors(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "error"]
