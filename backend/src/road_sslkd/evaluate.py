"""Evaluation on whole rasters with the project's sliding window (engine.predict_strips), not on crops."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import events
from .data import DatasetSpec, Label, LabelledSet, Normalizer, Raster
from .engine import STRIP_PIXELS, dihedral, predict_strips, predict_tiled
from .metrics import RoadMetrics, StripMetrics
from .precision import autocast


def torch_infer(model: torch.nn.Module, device: torch.device,
                dtype: Optional[torch.dtype] = None) -> Callable[[np.ndarray], np.ndarray]:
    """An engine ``infer`` function running a torch model (put in eval mode here, no grad) and returning
    probabilities; ``dtype`` runs it under autocast (precision.amp_dtype), None in float32 as evaluation does."""
    model.eval().to(memory_format=torch.channels_last)  # as in training: faster convolutions on GPUs and in oneDNN

    def infer(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad(), autocast(device, dtype):
            logits = model(torch.from_numpy(batch).to(device, memory_format=torch.channels_last))
        return torch.sigmoid(logits.float()).cpu().numpy()

    return infer


def predict_raster(infer: Callable[[np.ndarray], np.ndarray], raster: Raster, normalizer: Normalizer,
                   tile: int, overlap_percent: int) -> tuple[np.ndarray, np.ndarray]:
    """Road probability and validity of a whole raster."""
    image, valid = raster.read(0, 0, raster.height, raster.width)
    overlap = tile * overlap_percent // 100
    prob = predict_tiled(normalizer(image), infer, tile, overlap, batch=4)
    return prob, valid


Observer = Callable[[int, np.ndarray, np.ndarray, np.ndarray], None]
"""``observe(index, probability, road, known)`` sees the rows of each evaluated raster (the benchmark's figures
use it): once per strip, strips in row order, so a raster of one strip (up to STRIP_PIXELS) comes whole."""


class _Scoring:
    """One raster through engine.predict_strips: reads normalised rows, scores and observes the written ones."""

    def __init__(self, raster: Raster, label: Label, normalizer: Normalizer, threshold: float,
                 strips: StripMetrics, observe: Optional[Callable[[np.ndarray, np.ndarray, np.ndarray], None]]) -> None:
        self.raster, self.label, self.normalizer, self.threshold = raster, label, normalizer, threshold
        self.strips, self.observe = strips, observe
        self.row_off, self.valid = 0, np.zeros((0, raster.width), bool)

    def read(self, y0: int, y1: int) -> np.ndarray:
        image, self.valid = self.raster.read(y0, 0, y1 - y0, self.raster.width)
        self.row_off = y0
        return self.normalizer(image)

    def write(self, y0: int, y1: int, prob: np.ndarray) -> None:
        valid = self.valid[y0 - self.row_off : y1 - self.row_off]  # predict_strips writes inside the latest read
        truth = self.label.read(y0, 0, y1 - y0, self.raster.width)
        road, known = truth == 1, valid & (truth != 255)
        self.strips.add(prob >= self.threshold, road, known)
        if self.observe is not None:
            self.observe(prob, road, known)


def evaluate_items(infer: Callable[[np.ndarray], np.ndarray], items: list[tuple[Raster, Label]],
                   normalizer: Normalizer, tile: int, overlap_percent: int, threshold: float = 0.5,
                   observe: Optional[Observer] = None, strip_pixels: int = STRIP_PIXELS) -> RoadMetrics:
    """Road metrics of ``infer`` over whole rasters, each streamed in strips of about ``strip_pixels``.

    Memory follows the strips, not the rasters: the sliding window blends tiles across strip borders as over
    the whole raster (engine.predict_strips), and the counts are those of RoadMetrics.update on the whole raster.
    """
    metrics = RoadMetrics()
    overlap = tile * overlap_percent // 100
    for index, (raster, label) in enumerate(items):
        seen = functools.partial(observe, index) if observe is not None else None
        strips = StripMetrics(metrics)
        scoring = _Scoring(raster, label, normalizer, threshold, strips, seen)
        predict_strips(scoring.read, scoring.write, raster.height, raster.width, infer, tile, overlap, batch=4,
                       strip_pixels=strip_pixels)
        strips.close()
    return metrics


def evaluate_model(model: torch.nn.Module, items: list[tuple[Raster, Label]], normalizer: Normalizer,
                   tile: int, overlap_percent: int, device: torch.device,
                   observe: Optional[Observer] = None, threshold: float = 0.5, tta: bool = False) -> RoadMetrics:
    """Road metrics of ``model`` on whole rasters; with ``tta`` its mean over the 8 flips and right-angle
    rotations, as the cached teacher maps the students learn from (targets.py)."""
    was_training = model.training
    model.eval()
    infer = torch_infer(model, device)
    try:
        return evaluate_items(dihedral(infer) if tta else infer, items, normalizer, tile, overlap_percent, threshold,
                              observe)
    finally:
        model.train(was_training)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate trained models of a run on test rasters (each at the "
                              "decision threshold its run chose, 0.5 for runs older than that)")
    p.add_argument("run", type=Path, help="run folder (from road-sslkd train)")
    p.add_argument("--models", default="", help="comma-separated model names (default: all in the run)")
    p.add_argument("--data", type=Path, help="dataset folder whose split.json 'test' entries are used")
    p.add_argument("--test", nargs="+", default=[], metavar="IMAGE:MASK", help="test pairs")
    p.add_argument("--tta", action="store_true", help="score each model's mean over the 8 flips and right-angle "
                   "rotations (test-time augmentation, 8x the time): what the students learn from a teacher")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    from .runs import RunDir
    from .trainer import pick_device

    spec = DatasetSpec.from_args(args.data, test=args.test)
    if args.data and not spec.test:  # not the run's own test rasters instead: the user asked for these
        raise events.UserError(f"{args.data / 'split.json'} has no 'test' entries",
                               "add test pairs to it, pass --test IMAGE:MASK ... instead, or neither to score the "
                               "run's own test rasters")
    run = RunDir.open(args.run)
    pairs = spec.test or run.dataset.test
    if not pairs:
        raise events.UserError(f"no test rasters: {args.run} was trained without any",
                               "pass --test IMAGE:MASK ... or --data DIR with a 'test' split")
    items = LabelledSet(pairs, run.config.bands, run.config.label_width).items
    names = [n for n in args.models.split(",") if n] or sorted(p.stem for p in (run.path / "models").glob("*.pt"))
    device = pick_device(args.device)
    results = {}
    for i, name in enumerate(names):
        events.progress("evaluate", i, len(names))
        model = run.load_model(name).to(device)
        threshold = run.metrics()["models"].get(name, {}).get("threshold", 0.5)
        summary = evaluate_model(model, items, run.normalizer, run.config.tile, run.config.overlap, device,
                                 threshold=threshold, tta=args.tta).summary()
        for key, value in summary.items():
            events.metric(key, value, stage=name)
        results[name] = summary
    events.emit("done", results=results)


def onnx_throughput(paths: list[Path], channels: int, size: int = 512, batch: int = 2, repeats: int = 10,
                    threads: int = 0) -> list[float]:
    """Megapixels per second of each ONNX model with onnxruntime on the CPU, best of ``repeats`` batches.

    The models take turns, one batch each per round, so that a slow spell of the machine hits all of them
    alike, and their thread pools do not spin while idle: a spinning pool of one session took the cores from
    the next (in turns, one student measured 3.0 Mpx/s with spinning, 4.5 without; 5.1 alone)."""
    import time

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = [ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for path in paths]
    x = np.random.default_rng(0).standard_normal((batch, channels, size, size)).astype(np.float32)
    feeds = [{session.get_inputs()[0].name: x} for session in sessions]
    for session, feed in zip(sessions, feeds):
        session.run(None, feed)  # warm-up: first run allocates
    best = [float("inf")] * len(sessions)
    for _ in range(repeats):
        for i, (session, feed) in enumerate(zip(sessions, feeds)):
            start = time.perf_counter()
            session.run(None, feed)
            best[i] = min(best[i], time.perf_counter() - start)
    return [batch * size * size / seconds / 1e6 for seconds in best]
