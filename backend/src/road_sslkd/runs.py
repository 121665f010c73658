"""A run directory: resolved config, checkpoints, trained models, metrics; and clean stops on SIGTERM.

Layout: ``config.json`` (settings, dataset, normalisation, version), ``checkpoints/STAGE.pt`` while a stage
trains, ``models/NAME.pt`` when it has finished, ``metrics.json``, ``report.md``, ``student.onnx``, and
``.train.lock``, locked while a process trains the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from . import __version__, distributed
from .config import Config, stored_config
from .data import DatasetSpec, Normalizer
from .events import UserError
from .models import SegModel, build_model
from .plots import PRAccumulator

_stop = threading.Event()
LOCK_NAME = ".train.lock"


@contextlib.contextmanager
def training_lock(path: Path) -> Iterator[None]:
    """Hold the run folder's lock while this process trains it: a second trainer (a resume started while the
    run still trains, from the dock, Processing or a shell) would overwrite its checkpoints and models. The
    operating system drops the lock when the process ends, however it ends, so a crash leaves none behind."""
    handle = open(Path(path) / LOCK_NAME, "a+b")
    try:
        try:
            if os.name == "nt":
                import msvcrt

                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise UserError(f"{path} is being trained by another process", "wait for it to finish, or stop it "
                            "(Cancel in QGIS, Ctrl+C, SIGTERM) and resume then") from exc
        yield
    finally:
        handle.close()


def install_stop_handlers() -> None:
    """SIGTERM / SIGINT (and CTRL_BREAK on Windows) ask training to checkpoint and stop at the next step."""
    def request_stop(signum: int, _frame: Any) -> None:
        _stop.set()

    for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), request_stop)


def stop_requested() -> bool:
    return _stop.is_set()


def _atomic_write(path: Path, write: Any) -> None:
    if not distributed.is_main():
        return  # rank 0 writes the run folder of a distributed run: every rank holds the same state
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)  # a half-written file would only fill the disk further
        free = shutil.disk_usage(path.parent).free / 1e6 if path.parent.exists() else 0.0
        raise UserError(f"cannot write {path} ({free:.0f} MB free there): {exc}",
                        "free some disk space or make the run folder writable, then resume the run") from exc


def fingerprint(path: Path, chunk: int = 1 << 16) -> str:
    """Size and a hash of a file's first and last 64 KB: a changed raster is told from a copied one (a copy keeps
    both, where it may not keep the modification time)."""
    size = path.stat().st_size
    digest = hashlib.sha1(usedforsecurity=False)
    with open(path, "rb") as handle:
        digest.update(handle.read(chunk))
        handle.seek(max(0, size - chunk))
        digest.update(handle.read(chunk))
    return f"{size}:{digest.hexdigest()}"


def _images(dataset: DatasetSpec) -> list[Path]:
    """The rasters whose pixels a run caches (teacher outputs, normalisation): not the labels, read afresh."""
    return [*(p.image for p in dataset.labelled), *dataset.unlabelled, *(p.image for p in dataset.test)]


class RunDir:
    def __init__(self, path: Path, config: Config, dataset: DatasetSpec, normalizer: Optional[Normalizer],
                 fingerprints: Optional[dict[str, str]] = None) -> None:
        self.path = Path(path)
        self.config = config
        self.dataset = dataset
        self.normalizer = normalizer
        self.fingerprints = fingerprints or {}  # image path -> fingerprint() when the run started

    # -- creation and resumption ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, config: Config, dataset: DatasetSpec) -> RunDir:
        path = Path(path)
        if (path / "config.json").exists():
            raise UserError(f"{path} already holds a run", f"continue it with --resume {path}, or choose a new --out")
        if path.exists() and any(path.iterdir()):
            raise UserError(f"{path} is not empty", "choose a new or empty folder for --out; nothing was written")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create run folder {path}: {exc}", "choose a writable folder") from exc
        prints = {str(p.absolute()): fingerprint(p) for p in _images(dataset) if p.is_file()}
        run = cls(path, config, dataset, None, prints)
        run.save()
        return run

    @classmethod
    def open(cls, path: Path) -> RunDir:
        path = Path(path)
        try:
            data = json.loads((path / "config.json").read_text())
        except FileNotFoundError as exc:
            raise UserError(f"{path} holds no run (config.json missing)", "give the folder of an earlier run") from exc
        normalizer = Normalizer(**data["normalizer"]) if data.get("normalizer") else None
        config = stored_config(data["config"], str(path / "config.json"))
        return cls(path, config, DatasetSpec.from_json(data["dataset"]), normalizer, data.get("fingerprints"))

    def require_unchanged_images(self) -> None:
        """Stop a resume whose images changed since the run started: its cached teacher outputs and normalisation
        describe the old pixels (runs of older versions record no fingerprints)."""
        changed = [path for path, known in self.fingerprints.items()
                   if Path(path).is_file() and fingerprint(Path(path)) != known]
        if changed:
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise UserError(f"{changed[0]} changed since the run in {self.path} started{more}",
                            "restore the original file, or start a new run")

    def save(self) -> None:
        data = {
            "version": __version__,
            "config": self.config.to_json(),
            "dataset": self.dataset.to_json(),
            "normalizer": None if self.normalizer is None else vars(self.normalizer),
            "fingerprints": self.fingerprints,
        }
        _atomic_write(self.path / "config.json", lambda p: p.write_text(json.dumps(data, indent=2)))

    # -- checkpoints and models ----------------------------------------------------------------------------
    def checkpoint_path(self, stage: str) -> Path:
        return self.path / "checkpoints" / f"{stage}.pt"

    def save_checkpoint(self, stage: str, state: dict) -> Path:
        path = self.checkpoint_path(stage)
        path.parent.mkdir(exist_ok=True)
        _atomic_write(path, lambda p: torch.save(state, p))
        return path

    def load_checkpoint(self, stage: str) -> Optional[dict]:
        path = self.checkpoint_path(stage)
        return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None

    def model_path(self, name: str) -> Path:
        return self.path / "models" / f"{name}.pt"

    def has_model(self, name: str) -> bool:
        return self.model_path(name).exists()

    def save_model(self, name: str, model: SegModel) -> Path:
        path = self.model_path(name)
        # Maps cached from an earlier model of this name (targets.py) would be stale.
        shutil.rmtree(self.path / "targets" / name, ignore_errors=True)
        path.parent.mkdir(exist_ok=True)
        _atomic_write(path, lambda p: torch.save({"arch": model.name, "state_dict": model.state_dict()}, p))
        return path

    def load_model(self, name: str) -> SegModel:
        if not self.has_model(name):
            raise UserError(f"{self.path} has no trained model '{name}'", "run the stage that trains it first")
        saved = torch.load(self.model_path(name), map_location="cpu", weights_only=True)
        model = build_model(saved["arch"], len(self.config.bands), weights="none")
        model.load_state_dict(saved["state_dict"])
        return model

    # -- test predictions kept for figures ------------------------------------------------------------------
    def save_evaluation(self, name: str, pr: PRAccumulator, examples: list[np.ndarray]) -> None:
        """A model's test probability histograms and its first test predictions (uint8), for the report."""
        path = self.path / "evaluation" / f"{name}.npz"
        path.parent.mkdir(exist_ok=True)
        arrays = {"road": pr.road, "background": pr.background, **{f"example_{i}": e for i, e in enumerate(examples)}}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: given a name, numpy would append ".npz" to the temporary
                np.savez_compressed(f, **arrays)

        _atomic_write(path, write)

    def load_evaluation(self, name: str) -> tuple[PRAccumulator, list[np.ndarray]]:
        """What ``save_evaluation`` kept: the histograms and the example probabilities (0..1)."""
        with np.load(self.path / "evaluation" / f"{name}.npz") as data:
            pr = PRAccumulator()
            pr.road, pr.background = data["road"], data["background"]
            examples = [data[k] / 255.0 for k in sorted(k for k in data.files if k.startswith("example_"))]
        return pr, examples

    # -- metrics -------------------------------------------------------------------------------------------
    def curves(self) -> dict:
        """Training curves: {stage: {metric: [[step, value], ...]}}."""
        path = self.path / "curves.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def add_curve_points(self, stage: str, step: int, values: dict[str, float]) -> None:
        data = self.curves()
        for name, value in values.items():
            points = data.setdefault(stage, {}).setdefault(name, [])
            points[:] = [p for p in points if p[0] < step] + [[step, float(value)]]  # resumed runs repeat steps
        _atomic_write(self.path / "curves.json", lambda p: p.write_text(json.dumps(data)))

    def metrics(self) -> dict:
        path = self.path / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else {"models": {}}

    def update_metrics(self, name: str, values: dict) -> None:
        data = self.metrics()
        data["models"].setdefault(name, {}).update(values)
        _atomic_write(self.path / "metrics.json", lambda p: p.write_text(json.dumps(data, indent=2)))
