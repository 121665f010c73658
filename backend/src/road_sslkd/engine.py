"""Tiled inference with smooth blending: numpy only, so the QGIS plugin can run it in-process.

``predict_strips`` is the single sliding-window implementation of the project. It streams a raster in
horizontal strips of whole tile rows, so memory depends on the raster's width, never on its height;
``predict_tiled`` runs it on an array in memory (the backend evaluates torch models with it) and
``onnx_runtime`` runs ONNX students with it. This module must never import torch, rasterio or qgis.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

InferFn = Callable[[np.ndarray], np.ndarray]
"""Maps a float32 batch (N, C, T, T) to road probabilities (N, T, T) or (N, 1, T, T)."""

RowReader = Callable[[int, int], np.ndarray]
"""``read(y0, y1)``: the normalised image rows [y0, y1) as float32 (C, y1 - y0, W)."""

RowWriter = Callable[[int, int, np.ndarray], None]
"""``write(y0, y1, probability)``: final rows [y0, y1) as float32 (y1 - y0, W)."""

STRIP_PIXELS = 8 * 2**20
"""Target pixels per strip: enough tiles to fill batches on small rasters, bounded memory on huge ones."""


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering ``length`` with windows of ``tile``; the last window ends at the edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def blend_ramp(tile: int, overlap: int) -> np.ndarray:
    """1-D weights that fall linearly to a small floor over the overlap, so neighbouring tiles cross-fade.

    The floor keeps every pixel's total weight positive at the raster's border, where only one tile covers it.
    """
    ramp = np.ones(tile, dtype=np.float32)
    if overlap > 0:
        edge = np.linspace(0.05, 1.0, overlap, dtype=np.float32)
        ramp[:overlap] = edge
        ramp[-overlap:] = np.minimum(ramp[-overlap:], edge[::-1])
    return ramp


def _coverage(length: int, starts: list[int], ramp: np.ndarray) -> np.ndarray:
    """Sum of the 1-D ramps of all tiles over each position.

    Tile weights are separable and the tile grid is a product of row and column starts, so the 2-D sum of
    weights is the outer product of the row and column coverages: no full-size normaliser is ever stored.
    """
    total = np.zeros(length, dtype=np.float32)
    for start in starts:
        total[start : start + len(ramp)] += ramp
    return total


def pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad (C, h, w) at the bottom and right to at least (height, width): reflect where possible."""
    pad_h, pad_w = max(0, height - image.shape[1]), max(0, width - image.shape[2])
    if not pad_h and not pad_w:
        return image
    mode = "reflect" if pad_h < image.shape[1] and pad_w < image.shape[2] else "edge"
    return np.pad(image, ((0, 0), (0, pad_h), (0, pad_w)), mode=mode)


def dihedral(infer: InferFn) -> InferFn:
    """``infer`` averaged over the 8 flips and right-angle rotations of each tile (test-time augmentation).

    Roads have no preferred orientation, so the views are equally valid and their mean is a better
    estimate than any one of them, at 8 passes per tile. Tiles need not be square: the model is convolutional.
    """
    def averaged(batch: np.ndarray) -> np.ndarray:
        total = np.zeros((batch.shape[0], batch.shape[2], batch.shape[3]), dtype=np.float32)
        for turns in range(4):
            for flip in (False, True):
                view = np.rot90(batch[..., ::-1] if flip else batch, turns, axes=(2, 3))
                prob = np.asarray(infer(np.ascontiguousarray(view)), dtype=np.float32)
                prob = np.rot90(prob.reshape(view.shape[0], *view.shape[2:]), -turns, axes=(1, 2))
                total += prob[..., ::-1] if flip else prob
        return total / 8

    return averaged


def predict_strips(
    read: RowReader,
    write: RowWriter,
    height: int,
    width: int,
    infer: InferFn,
    tile: int,
    overlap: int,
    batch: int = 4,
    strip_pixels: int = STRIP_PIXELS,
    progress: Optional[Callable[[int, int], None]] = None,
    cancelled: Optional[Callable[[], bool]] = None,
) -> bool:
    """Stream a (height x width) image through ``infer`` in overlapping tiles; False when cancelled.

    Strips are groups of whole tile rows of one global tile grid: rows shared with the next strip stay in
    the accumulator until that strip has added its tiles, so the result equals whole-image blending exactly
    (no seam at strip borders). ``write`` gets rows in order, each range inside the rows of the latest
    ``read`` call; images smaller than a tile are padded, so any size works with fixed-size tiles.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap} tile={tile}")
    full_h, full_w = max(height, tile), max(width, tile)
    stride = tile - overlap
    ys, xs = tile_starts(full_h, tile, stride), tile_starts(full_w, tile, stride)
    ramp = blend_ramp(tile, overlap)
    weights = np.outer(ramp, ramp)
    row_cover, col_cover = _coverage(full_h, ys, ramp), _coverage(full_w, xs, ramp)
    rows_per_strip = max(1, strip_pixels // (tile * full_w))
    strips = [ys[i : i + rows_per_strip] for i in range(0, len(ys), rows_per_strip)]
    total, done = len(ys) * len(xs), 0
    carry = np.zeros((0, full_w), dtype=np.float32)  # blended rows shared with the next strip
    for index, strip in enumerate(strips):
        y0, y1 = strip[0], strip[-1] + tile
        image = pad_to(read(y0, min(y1, height)), y1 - y0, full_w)
        acc = np.zeros((y1 - y0, full_w), dtype=np.float32)
        acc[: len(carry)] = carry
        windows = [(y, x) for y in strip for x in xs]
        for first in range(0, len(windows), batch):
            if cancelled is not None and cancelled():
                return False
            chunk = windows[first : first + batch]
            stack = np.stack([image[:, y - y0 : y - y0 + tile, x : x + tile] for y, x in chunk])
            probs = np.asarray(infer(stack.astype(np.float32, copy=False)), dtype=np.float32)
            for (y, x), prob in zip(chunk, probs.reshape(len(chunk), tile, tile)):
                acc[y - y0 : y - y0 + tile, x : x + tile] += prob * weights
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        final = strips[index + 1][0] if index + 1 < len(strips) else full_h
        rows = min(final, height) - y0
        blended = acc[:rows, :width] / np.outer(row_cover[y0 : y0 + rows], col_cover[:width])
        write(y0, y0 + rows, blended)
        carry = acc[final - y0 :]
    return True


def predict_tiled(
    image: np.ndarray,
    infer: InferFn,
    tile: int,
    overlap: int,
    batch: int = 4,
    progress: Optional[Callable[[int, int], None]] = None,
    cancelled: Optional[Callable[[], bool]] = None,
) -> Optional[np.ndarray]:
    """Road probability (H, W) for a normalised image (C, H, W); None when ``cancelled`` said stop."""
    if image.ndim != 3:
        raise ValueError(f"expected an image of shape (C, H, W), got {image.shape}")
    height, width = image.shape[1:]
    out = np.empty((height, width), dtype=np.float32)

    def write(y0: int, y1: int, probability: np.ndarray) -> None:
        out[y0:y1] = probability

    finished = predict_strips(
        lambda y0, y1: image[:, y0:y1], write, height, width, infer, tile, overlap, batch,
        progress=progress, cancelled=cancelled,
    )
    return out if finished else None
