"""Blocking ``road-sslkd`` runs for Processing algorithms (their own worker thread, or ``qgis_process``).

The dock uses the asynchronous QProcess runner; an algorithm's ``processAlgorithm`` must block until the
backend is done, so this is plain ``subprocess`` with the same protocol: argument list, cleaned
environment, JSON-lines events on stdout, SIGTERM on cancel (the backend checkpoints and exits 143).
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .backend import BackendLocator, hidden_window_flags
from .protocol import RunOutcome, classify_exit, clean_environment, parse_event_line

CANCEL_GRACE_S = 120.0


@dataclass
class CliResult:
    outcome: RunOutcome
    events: list[dict[str, Any]] = field(default_factory=list)

    def artifact(self, kind: str) -> Optional[str]:
        """Path of the last ``artifact`` event of this kind."""
        paths = [e.get("path") for e in self.events if e.get("event") == "artifact" and e.get("kind") == kind]
        return str(paths[-1]) if paths and paths[-1] else None


def backend_command() -> list[str]:
    """``road-sslkd`` of the backend the dock would use; RuntimeError with the places tried when none."""
    status = BackendLocator().find()
    if not status.found:
        tried = "; ".join(status.notes) or "no backend interpreter found"
        raise RuntimeError(f'The Road SSLKD backend is not installed ({tried}). Use "Set up backend" in the dock.')
    return status.command()


def run_backend(
    args: list[str],
    on_event: Optional[Callable[[dict[str, Any]], None]] = None,
    on_log: Optional[Callable[[str], None]] = None,
    cancelled: Optional[Callable[[], bool]] = None,
    command: Optional[list[str]] = None,
    run_dir: Optional[str] = None,
) -> CliResult:
    """Run ``road-sslkd ARGS`` to the end; ``cancelled()`` polled twice a second sends SIGTERM."""
    command = command or backend_command()
    process = subprocess.Popen(
        [*command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=clean_environment(os.environ),
        creationflags=hidden_window_flags(),
    )
    tail: deque[str] = deque(maxlen=30)
    lines: queue.Queue = queue.Queue()

    def pump(stream: Any, kind: str) -> None:  # reader threads only queue lines: callbacks stay on this thread
        for line in stream:
            lines.put((kind, line))
        lines.put((kind, None))

    readers = [
        threading.Thread(target=pump, args=(s, k), daemon=True)
        for s, k in ((process.stdout, "out"), (process.stderr, "err"))
    ]
    for reader in readers:
        reader.start()
    events: list[dict[str, Any]] = []
    open_streams, terminated_at = 2, None
    while open_streams:
        if cancelled is not None and terminated_at is None and cancelled():
            process.terminate()  # SIGTERM: the backend checkpoints and exits 143
            terminated_at = time.monotonic()
        if terminated_at is not None and time.monotonic() - terminated_at > CANCEL_GRACE_S:
            process.kill()
        try:
            kind, line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            open_streams -= 1
            continue
        event = parse_event_line(line) if kind == "out" else None
        if event is not None:
            events.append(event)
            if on_event:
                on_event(event)
        elif line.strip():
            if kind == "err":
                tail.append(line.rstrip())
            if on_log:
                on_log(line.rstrip())
    code = process.wait()
    process.stdout.close()
    process.stderr.close()
    error = next((e for e in reversed(events) if e["event"] == "error"), None)
    done = next((e for e in reversed(events) if e["event"] == "done"), None)
    was_cancelled = bool(cancelled and cancelled())
    crashed = code < 0
    outcome = classify_exit(-code if crashed else code, crashed, was_cancelled, error, done, list(tail), run_dir)
    return CliResult(outcome, events)
