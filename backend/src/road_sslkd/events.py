"""JSON-lines events on stdout (the plugin <-> backend protocol) and human logs on stderr.

Every event is one JSON object per line with an ``event`` key: ``progress``, ``metric``, ``artifact``,
``warning``, ``error``, ``done`` (see ../shared/DESIGN.md). Nothing else is ever printed to stdout.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger("road_sslkd")
_lock = threading.Lock()
_redirect: Optional[Callable[[str, dict[str, Any]], bool]] = None


class UserError(Exception):
    """A problem the user can fix: bad input, missing file, conflicting run directory."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __reduce__(self) -> tuple:
        return type(self), (self.message, self.hint)  # keeps the hint across processes (predict --workers)


class Cancelled(Exception):
    """Raised when SIGTERM asked us to stop; whatever can be resumed is already saved."""

    def __init__(self, message: str, hint: str = "continue with --resume RUN_DIR") -> None:
        super().__init__(message)
        self.hint = hint


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item"):  # numpy / torch scalars
        return _clean(value.item())
    return value


def redirect(handler: Optional[Callable[[str, dict[str, Any]], bool]]) -> None:
    """Offer every event to ``handler(event, fields)`` first; True means it took the event off stdout.

    Other ranks of a distributed run drop theirs; predict's worker processes pass theirs to the parent.
    """
    global _redirect
    _redirect = handler


def emit(event: str, **fields: Any) -> None:
    """Write one event line to stdout and flush, so a reading process sees it at once."""
    if _redirect is not None and _redirect(event, fields):
        return
    line = json.dumps({"event": event, "time": round(time.time(), 3), **_clean(fields)})
    with _lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def progress(stage: str, step: int, total: int, eta: float | None = None, **extra: Any) -> None:
    emit("progress", stage=stage, step=step, total=total, eta=None if eta is None else round(eta, 1), **extra)


def metric(name: str, value: float, stage: str, step: int | None = None) -> None:
    emit("metric", name=name, value=float(value), stage=stage, step=step)


def artifact(kind: str, path: str) -> None:
    emit("artifact", kind=kind, path=str(path))


def warning(message: str) -> None:
    log.warning(message)
    emit("warning", message=message)


def error(message: str, hint: str = "", **extra: Any) -> None:
    log.error("%s%s", message, f" ({hint})" if hint else "")
    emit("error", message=message, hint=hint, **extra)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
