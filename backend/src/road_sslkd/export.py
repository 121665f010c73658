"""ONNX export of trained models following DESIGN.md's contract, verified against torch.

The graph takes ``image`` (float32 NCHW, pixels / 255 then standardised with the metadata's mean and std)
and returns ``road_probability`` (N, 1, H, W, sigmoid applied, so Deepness reads it as a one-class map).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import torch
from torch import nn

from . import __version__, events
from .engine import pad_to
from .events import UserError
from .models import SegModel, count_parameters

INPUT, OUTPUT = "image", "road_probability"


class _Probabilities(nn.Module):
    def __init__(self, model: SegModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x))


def onnx_metadata(model: SegModel, mean: list[float], std: list[float], tile: int, overlap_percent: int,
                  resolution_cm: Optional[float], extra: Optional[dict[str, Any]] = None,
                  threshold: float = 0.5) -> dict[str, str]:
    """Deepness-compatible keys plus our provenance keys, every value JSON text: Deepness json.loads each key
    it reads, plain strings such as ``model_type`` included."""
    meta: dict[str, Any] = {
        "model_type": "Segmentor",
        "class_names": {"0": "road"},
        "tile_size": tile,
        "tiles_size": tile,  # Deepness's code and docs disagree on the key: write both
        "tiles_overlap": overlap_percent,
        "standardization_mean": mean,
        "standardization_std": std,
        "seg_thresh": threshold,
        "road_sslkd_version": __version__,
        "road_sslkd_architecture": model.name,
        "road_sslkd_output": "probabilities",
        "road_sslkd_parameters": count_parameters(model),
    }
    if resolution_cm is not None:
        meta["resolution"] = resolution_cm
    meta.update(extra or {})
    return {k: json.dumps(v) for k, v in meta.items()}


def export_onnx(model: SegModel, path: Path, metadata: dict[str, str], overwrite: bool = False,
                fixed_size: Optional[int] = None) -> Path:
    """Write ``path`` (via a temporary file), add metadata, and check onnxruntime matches torch.

    Height and width are dynamic unless ``fixed_size`` is given (for tools that take the tile size from the
    input's shape, such as the Deepness plugin); the batch size always is."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists", "pass --overwrite to replace it, or choose another --out")
    model = model.cpu().eval()
    wrapped = _Probabilities(model).eval()
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    side = fixed_size or 256
    example = torch.randn(1, channels, side, side)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the folder of {path}: {exc}", "choose a writable --out") from exc
    tmp = path.with_name(path.name + ".tmp")
    dynamic = {0: "batch"} if fixed_size else {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks that are constant per tile size
        torch.onnx.export(wrapped, (example,), tmp, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: dynamic, OUTPUT: dynamic}, opset_version=17, dynamo=False)
    proto = onnx.load(str(tmp))
    if fixed_size:  # the tracer leaves the output's side symbolic after smp's resizes; Deepness wants it square
        for dim in proto.graph.output[0].type.tensor_type.shape.dim[2:]:
            dim.dim_value = fixed_size
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(tmp))
    verify(wrapped, tmp, channels, fixed_size)
    os.replace(tmp, path)
    return path


def verify(wrapped: nn.Module, path: Path, channels: int, fixed_size: Optional[int] = None,
           atol: float = 1e-3) -> float:
    """Largest |onnxruntime - torch| probability on random input of two shapes (two batch sizes at a fixed
    size); raises when above ``atol``.

    1e-3 is a quarter of one step of the uint8 probability rasters the engine writes; deep fp32 networks
    differ between the two runtimes by ~1e-4 (a random-weight U-Net-ResNet34 by 1.8e-4)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    sides = ((fixed_size, fixed_size),) * 2 if fixed_size else ((128, 128), (160, 224))
    for shape in ((2, channels, *sides[0]), (1, channels, *sides[1])):
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        got = session.run(None, {INPUT: x})[0]
        with torch.no_grad():
            want = wrapped(torch.from_numpy(x)).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
    if worst > atol:
        raise RuntimeError(f"ONNX export of {path} differs from torch by {worst:.2e} (> {atol})")
    return worst


def export_run_model(run: Any, name: str, path: Path, overwrite: bool = False,
                     extra: Optional[dict[str, Any]] = None, fixed_size: bool = False) -> Path:
    """Export a trained model of a run folder with the run's normalisation and provenance (``fixed_size``:
    height and width fixed at the run's tile)."""
    import rasterio

    from .predict import ground_resolution_m

    cfg = run.config
    model = run.load_model(name)
    resolution, dtype = None, None
    first = run.dataset.labelled[0].image if run.dataset.labelled else None
    if first is not None and first.exists():  # the first training raster stands for all: resolution, data type
        with rasterio.open(first) as ds:
            ground = ground_resolution_m(ds)
            dtype = ds.dtypes[cfg.bands[0] - 1]
        resolution = None if ground is None else round(100 * ground[0], 3)
    elif first is not None:  # the data moved or stayed on another machine: the model is still usable
        events.warning(f"{first} is not there: the model records no ground resolution or data type, so "
                       "segmentation reads rasters at their own resolution and cannot warn about their type")
    summary = {
        "labelled": len(run.dataset.labelled), "unlabelled": len(run.dataset.unlabelled),
        "teachers": [cfg.teacher_a, cfg.teacher_b], "preset": cfg.preset, "bands": cfg.bands,
        # Prediction warns when a raster of another data type comes: every type is divided by 255 alike.
        **({"dtype": dtype} if dtype else {}),
        "metrics": run.metrics()["models"].get(name, {}),
    }
    meta = onnx_metadata(model, run.normalizer.mean, run.normalizer.std, cfg.tile, cfg.overlap, resolution,
                         {"road_sslkd_model": name, "road_sslkd_training": summary, **(extra or {})},
                         threshold=summary["metrics"].get("threshold", 0.5))
    return export_onnx(model, path, meta, overwrite=overwrite, fixed_size=cfg.tile if fixed_size else None)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a trained model of a run to ONNX")
    p.add_argument("run", type=Path, help="run folder (from road-sslkd train)")
    p.add_argument("--model", default="student_sslkd", help="model name in the run (default: student_sslkd)")
    p.add_argument("--out", type=Path, help="ONNX path (default: RUN/MODEL.onnx)")
    p.add_argument("--int8", action="store_true", help="also write an INT8-quantised copy (OUT with .int8.onnx), "
                   "kept only within 1 IoU point")
    p.add_argument("--fixed-size", action="store_true",
                   help="fix the input's height and width at the run's tile size (the batch stays dynamic), for "
                   "tools that take the tile size from the model's input shape, such as the Deepness plugin")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    from .runs import RunDir

    run = RunDir.open(args.run)
    out = args.out or run.path / f"{args.model}.onnx"
    events.artifact("onnx", export_run_model(run, args.model, out, args.overwrite, fixed_size=args.fixed_size))
    if args.int8:
        export_int8(run, out, args.overwrite)
    events.emit("done", onnx=str(out))


def export_int8(run: Any, fp32: Path, overwrite: bool = False) -> Optional[Path]:
    """``MODEL.int8.onnx`` beside ``fp32``, calibrated on the run's imagery; None (and no file) if it loses
    a point of road IoU or more."""
    from .quantize import quantize_int8

    int8 = fp32.with_suffix(".int8.onnx")
    if int8.exists() and not overwrite:
        raise UserError(f"{int8} exists", "pass --overwrite to replace it")
    quantize_int8(fp32, int8, _calibration_tiles(run))
    if not _int8_keeps_quality(run, fp32, int8):
        int8.unlink()
        return None
    events.artifact("onnx_int8", int8)
    return int8


INT8_MAX_DROP = 0.01  # IoU (1 point): a faster model that misses more roads than this is not worth it


def _calibration_tiles(run: Any, count: int = 8, size: int = 256) -> Iterator[np.ndarray]:
    """Raw size x size tiles from the centre of the run's own rasters (unlabelled first).

    Smaller rasters are padded as inference pads them: the encoders need sides divisible by 32.
    """
    import rasterio
    from rasterio.windows import Window

    images = list(run.dataset.unlabelled) + [p.image for p in run.dataset.labelled]
    for path in images[:count]:
        with rasterio.open(path) as ds:
            h, w = min(size, ds.height), min(size, ds.width)
            tile = ds.read(run.config.bands, window=Window((ds.width - w) // 2, (ds.height - h) // 2, w, h))
        yield pad_to(tile, size, size)


def _int8_keeps_quality(run: Any, fp32: Path, int8: Path) -> bool:
    """Road IoU of both ONNX files on the run's test rasters (else its labelled ones); True if INT8 may stay."""
    from .data import LabelledSet
    from .evaluate import evaluate_items
    from .onnx_runtime import load_model

    cfg = run.config
    pairs = run.dataset.test or run.dataset.labelled
    if not run.dataset.test:
        events.warning("the run has no test rasters: the INT8 check uses its labelled (training) rasters")
    items = LabelledSet(pairs, cfg.bands, cfg.label_width).items
    ious = {}
    for kind, path in (("fp32", fp32), ("int8", int8)):
        model = load_model(path, "cpu")
        ious[kind] = evaluate_items(model.infer, items, run.normalizer, cfg.tile, cfg.overlap,
                                    model.info.threshold).iou
        events.metric(f"iou_{kind}", ious[kind], stage="int8_check")
    drop = ious["fp32"] - ious["int8"]
    if drop >= INT8_MAX_DROP:
        events.warning(f"INT8 copy discarded: road IoU {100 * ious['int8']:.1f} % against {100 * ious['fp32']:.1f} % "
                       f"in fp32, a drop of {100 * drop:.1f} points (at most {100 * INT8_MAX_DROP:.0f} allowed)")
        return False
    return True
