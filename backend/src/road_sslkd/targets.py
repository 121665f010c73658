"""Teacher outputs computed once and cached: whole-raster road probabilities of a frozen teacher.

A frozen teacher gives the same answer every step, so running it inside the training loop (as the paper
does) spends most of a CPU step on forward passes whose results never change. Each teacher instead
predicts every training raster once, with the evaluation's sliding window, and the samplers crop these maps
alongside the images (data.CropSampler ``targets``). Geometric augmentations and CutMix are applied to
image and targets alike; photometric ones only to the student's view, so the targets stay those of the
clean (weak) view, as in weak-to-strong consistency.

Feature distillation needs the teachers' decoder features for the student's view; they are cached the same
way (one forward pass per raster, on its grid, at the decoder's own stride) instead of running the
teachers at every step, which cost two thirds of a distillation step on a CPU. The features are stored L2
normalised per pixel, as the loss compares them, so int8 (x 127) keeps them to about 1 %.

With ``teacher_tta`` the students' probability maps are the mean of each teacher over the 8 flips and
right-angle rotations of the raster (engine.dihedral): eight passes, once per raster, for targets that
score higher than one pass (docs/method.md, "Test-time augmentation of the teachers").

Maps are .npy files under RUN_DIR/targets/<model>/ (probabilities, uint8 x 255), RUN_DIR/targets/<model>/dihedral/
(the same with test-time augmentation) and RUN_DIR/targets/<model>/features/ (int8 features), read memory-mapped.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import events
from .data import CropSampler, Raster, road_prior
from .engine import dihedral, pad_to
from .evaluate import predict_raster, torch_infer
from .models import SegModel
from .precision import amp_dtype, autocast
from .runs import stop_requested
from .trainer import Context

WHOLE_RASTER_PX = 1024  # rasters up to this side are predicted in one tile: no blending, least padding


def _window(raster: Raster, tile: int, overlap: int) -> tuple[int, int]:
    """Tile and overlap (percent): the whole raster at once when it is small enough."""
    side = max(raster.height, raster.width)
    return (-(-side // 32) * 32, 0) if side <= WHOLE_RASTER_PX else (2 * tile, overlap)


def teacher_maps(ctx: Context, model_name: str, rasters: list[Raster], tta: bool = False) -> list[np.ndarray]:
    """One cached probability map per raster for the run's model ``model_name`` (computed when missing)."""
    folder = ctx.run.path / "targets" / model_name / ("dihedral" if tta else "")
    paths = [folder / _file_name(r) for r in rasters]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        model = ctx.run.load_model(model_name).to(ctx.device)
        infer = torch_infer(model, ctx.device, _dtype(ctx))
        infer = dihedral(infer) if tta else infer
        for done, i in enumerate(missing):
            _stop_if_asked(f"targets {model_name}")
            if done % 10 == 0:
                events.progress(f"targets {model_name}", done, len(missing))
            tile, overlap = _window(rasters[i], ctx.config.tile, ctx.config.overlap)
            prob, valid = predict_raster(infer, rasters[i], ctx.normalizer, tile, overlap)
            _save(paths[i], _uint8(prob, valid))
        events.progress(f"targets {model_name}", len(missing), len(missing))
    return [np.load(p, mmap_mode="r") for p in paths]


def _stop_if_asked(what: str) -> None:
    """Cancel between rasters: caching a large pool takes minutes, and the maps written so far are kept."""
    if stop_requested():
        raise events.Cancelled(f"stopped while caching {what}; the rasters done so far are kept")


def _uint8(prob: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """A probability map as stored and counted here: x 255, rounded, 0 where the raster has no data."""
    return np.where(valid, np.round(prob * 255), 0).astype(np.uint8)


def teacher_features(ctx: Context, model_name: str, rasters: list[Raster],
                     layer: int = 0) -> tuple[int, list[np.ndarray]]:
    """The stride of ``model_name``'s decoder feature layer ``layer`` (models.SegModel.forward_features) and one
    cached int8 (C, H/stride, W/stride) map of it per raster."""
    folder = ctx.run.path / "targets" / model_name / ("features" if layer == 0 else f"features_{layer}")
    paths = [folder / _file_name(r) for r in rasters]
    model = ctx.run.load_model(model_name).to(ctx.device).eval()  # features are read without torch_infer
    channels, stride = model.feature_shape(layer, ctx.in_channels)
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        need = sum(channels * -(-rasters[i].height // stride) * -(-rasters[i].width // stride) for i in missing)
        free = shutil.disk_usage(folder).free
        if need > free * 0.9:
            raise events.UserError(
                f"the teachers' feature cache needs {need / 1e9:.1f} GB and {folder} has {free / 1e9:.1f} GB free",
                "free disk space, or train without feature distillation (setting w_feat 0)")
        for done, i in enumerate(missing):
            _stop_if_asked(f"features {model_name}")
            if done % 10 == 0:
                events.progress(f"features {model_name}", done, len(missing))
            _save(paths[i], _raster_features(model, rasters[i], ctx, channels, stride, layer))
        events.progress(f"features {model_name}", len(missing), len(missing))
    return stride, [np.load(p, mmap_mode="r") for p in paths]


def _dtype(ctx: Context) -> Optional[torch.dtype]:
    # Maps are stored as uint8 and features as int8: finer than bfloat16 is lost anyway.
    return amp_dtype(ctx.device, ctx.config.amp)


def _raster_features(model: SegModel, raster: Raster, ctx: Context, channels: int, stride: int, layer: int = 0,
                     margin: int = 64) -> np.ndarray:
    """Per-pixel normalised int8 features of a whole raster, in blocks with a margin of context on each side."""
    block = WHOLE_RASTER_PX
    out = np.zeros((channels, -(-raster.height // stride), -(-raster.width // stride)), np.int8)
    for y in range(0, raster.height, block):
        for x in range(0, raster.width, block):
            y0, x0 = max(0, y - margin), max(0, x - margin)
            y1, x1 = min(raster.height, y + block + margin), min(raster.width, x + block + margin)
            image, _ = raster.read(y0, x0, y1 - y0, x1 - x0)
            image = pad_to(ctx.normalizer(image), -(-(y1 - y0) // 32) * 32, -(-(x1 - x0) // 32) * 32)
            with torch.no_grad(), autocast(ctx.device, _dtype(ctx)):
                features = model.forward_features(torch.from_numpy(np.ascontiguousarray(image))[None].to(ctx.device),
                                                  layers=(layer,))[1][0]
            features = torch.nn.functional.normalize(features[0].float(), dim=0).cpu().numpy()
            fy, fx = (y - y0) // stride, (x - x0) // stride
            h, w = -(-min(block, raster.height - y) // stride), -(-min(block, raster.width - x) // stride)
            out[:, y // stride : y // stride + h, x // stride : x // stride + w] = np.round(
                features[:, fy : fy + h, fx : fx + w] * 127)
    return out


def _file_name(raster: Raster) -> str:
    # Keyed by raster and bands, not by position, so runs with another split reuse what they share.
    key = hashlib.sha1(f"{raster.path.resolve()}|{raster.bands}".encode()).hexdigest()[:12]
    return f"{raster.path.stem}_{key}.npy"


def _save(path: Path, array: np.ndarray) -> None:
    partial = path.with_name(path.stem + ".partial.npy")
    np.save(partial, array)
    partial.replace(path)  # an interrupted run never leaves a map that looks complete


def prior_threshold(maps: list[list[np.ndarray]], fraction: float, rows: int = 1024) -> float:
    """The ensemble probability above which ``fraction`` of the pixels of these cached maps lie.

    ``maps`` holds one list of uint8 maps per teacher; the ensemble is their mean, as the students see it.
    Counted exactly from a histogram of the summed maps, a block of rows at a time.
    """
    top = 255 * len(maps)
    hist = np.zeros(top + 1, np.int64)
    for per_raster in zip(*maps):
        for y in range(0, per_raster[0].shape[0], rows):
            total = sum(m[y : y + rows].astype(np.int32) for m in per_raster)
            hist += np.bincount(total.ravel(), minlength=top + 1)
    above = 1 - np.cumsum(hist) / max(1, hist.sum())  # above[v]: share of pixels > v (0 at the top)
    return float(np.clip(np.argmax(above <= fraction + 1e-12) / top, 1e-3, 1 - 1e-3))


def aligned_threshold(ctx: Context, maps: list[list[np.ndarray]], stage: str, kind: str) -> float:
    """The ensemble probability that prior alignment shifts to 0.5 on these maps (0.5 with it off).

    Reported as the metric event ``prior_threshold_<kind>`` of ``stage`` and in the log.
    """
    if not ctx.config.align_prior:
        return 0.5
    prior = road_prior(ctx.labelled.labels)
    threshold = prior_threshold(maps, prior)
    events.metric(f"prior_threshold_{kind}", threshold, stage=stage)
    events.log.info("%s: the teachers' %.3f becomes 0.5 on %s crops (labelled road fraction %.3f)",
                    stage, threshold, kind, prior)
    return threshold


DECISION_SAMPLE = 32  # rasters of the pool that set a model's decision threshold (evenly spread)


def decision_threshold(ctx: Context, model: SegModel) -> float:
    """The road threshold a trained model ships with and is evaluated at: 0.5, or with ``align_decision``
    prior alignment of its own output.

    That is the probability above which the model calls as large a share of the unlabelled pool (the
    labelled rasters without one) road as the labelled masks hold: the label-free rule the students' targets
    get (aligned_threshold), applied alike to every model. Its maps are not cached: a model's name outlives
    the model (the ablation retrains ``student_sslkd`` over one shared cache).
    """
    if not ctx.config.align_decision:
        return 0.5
    pool = (ctx.unlabelled or ctx.labelled).rasters
    sample = pool[:: max(1, -(-len(pool) // DECISION_SAMPLE))]
    # Predicted as the evaluation and the ONNX model predict (float32, the run's tiles): an overconfident
    # student's probabilities crowd near 1, where bfloat16 or another window moves its threshold by points.
    was_training = model.training
    infer = torch_infer(model, ctx.device)
    maps = []
    for raster in sample:
        prob, valid = predict_raster(infer, raster, ctx.normalizer, ctx.config.tile, ctx.config.overlap)
        maps.append(_uint8(prob, valid))
    model.train(was_training)
    stored = prior_threshold([maps], road_prior(ctx.labelled.labels))
    # That count is of map values strictly above ``stored``: road starts one uint8 step higher, which is also
    # where the plugin's uint8 probability rasters put it (segment.binary_mask).
    return min(stored + 1 / 255, 1 - 1e-3)


def attach(ctx: Context, teachers: tuple[str, ...], sampler: CropSampler, layers: tuple[int, ...] = (),
           tta: bool = False) -> CropSampler:
    """``sampler`` with the teachers' cached maps of its rasters attached, and their decoder features of
    ``layers``, teacher by teacher and layer by layer within each."""
    return sampler.with_targets([teacher_maps(ctx, t, sampler.rasters, tta) for t in teachers],
                                [teacher_features(ctx, t, sampler.rasters, k) for t in teachers for k in layers])
