"""Teacher outputs computed once and cached: whole-raster road probabilities of a frozen teacher.

A frozen teacher gives the same answer every step, so running it inside the training loop (as the paper
does) spends most of a CPU step on forward passes whose results never change. Each teacher instead
predicts every training raster once, with the evaluation's sliding window, and the samplers crop these maps
alongside the images (data.CropSampler ``targets``). Geometric augmentations and CutMix are applied to
image and targets alike; photometric ones only to the student's view, so the targets stay those of the
clean (weak) view, as in weak-to-strong consistency.

Maps are uint8 (probability x 255) .npy files under RUN_DIR/targets/<model>/, read memory-mapped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from . import events
from .data import CropSampler, Raster
from .evaluate import predict_raster, torch_infer
from .trainer import Context

WHOLE_RASTER_PX = 1024  # rasters up to this side are predicted in one tile: no blending, least padding


def _window(raster: Raster, tile: int, overlap: int) -> tuple[int, int]:
    """Tile and overlap (percent): the whole raster at once when it is small enough."""
    side = max(raster.height, raster.width)
    return (-(-side // 32) * 32, 0) if side <= WHOLE_RASTER_PX else (2 * tile, overlap)


def teacher_maps(ctx: Context, model_name: str, rasters: list[Raster]) -> list[np.ndarray]:
    """One cached probability map per raster for the run's model ``model_name`` (computed when missing)."""
    folder = ctx.run.path / "targets" / model_name
    paths = [folder / _file_name(r) for r in rasters]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        model = ctx.run.load_model(model_name).to(ctx.device).eval()
        infer = torch_infer(model, ctx.device)
        for done, i in enumerate(missing):
            if done % 10 == 0:
                events.progress(f"targets {model_name}", done, len(missing))
            tile, overlap = _window(rasters[i], ctx.config.tile, ctx.config.overlap)
            prob, valid = predict_raster(infer, rasters[i], ctx.normalizer, tile, overlap)
            _save(paths[i], np.where(valid, np.round(prob * 255), 0).astype(np.uint8))
        events.progress(f"targets {model_name}", len(missing), len(missing))
    return [np.load(p, mmap_mode="r") for p in paths]


def _file_name(raster: Raster) -> str:
    # Keyed by raster and bands, not by position, so runs with another split reuse what they share.
    key = hashlib.sha1(f"{raster.path.resolve()}|{raster.bands}".encode()).hexdigest()[:12]
    return f"{raster.path.stem}_{key}.npy"


def _save(path: Path, array: np.ndarray) -> None:
    partial = path.with_name(path.stem + ".partial.npy")
    np.save(partial, array)
    partial.replace(path)  # an interrupted run never leaves a map that looks complete


def attach(ctx: Context, teachers: tuple[str, ...], sampler: CropSampler) -> CropSampler:
    """``sampler`` with the teachers' cached maps of its rasters attached."""
    return sampler.with_targets([teacher_maps(ctx, t, sampler.rasters) for t in teachers])
