"""Weak (geometric) and strong (photometric, CutMix) augmentations on normalised batches, in torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

Batch = dict[str, torch.Tensor]


def weak(batch: Batch) -> Batch:
    """A random flip and quarter-turn per sample, applied alike to image, label and validity."""
    out = {k: v.clone() for k, v in batch.items()}
    for i in range(batch["image"].shape[0]):
        k = int(torch.randint(0, 4, ()))
        flip = bool(torch.randint(0, 2, ()))
        for value in out.values():
            x = value[i]
            x = torch.rot90(x, k, dims=(-2, -1))
            value[i] = torch.flip(x, dims=(-1,)) if flip else x
    return out


def strong(images: torch.Tensor) -> torch.Tensor:
    """Colour jitter, random greyscale, blur and noise per sample (pixel positions unchanged)."""
    b, c = images.shape[:2]
    dev = images.device
    x = images.clone()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = torch.empty(b, 1, 1, 1, device=dev).uniform_(0.6, 1.4)
    brightness = torch.empty(b, 1, 1, 1, device=dev).uniform_(-0.4, 0.4)
    shift = torch.empty(b, c, 1, 1, device=dev).uniform_(-0.25, 0.25)
    x = (x - mean) * contrast + mean + brightness + shift
    grey = torch.rand(b, 1, 1, 1, device=dev) < 0.2
    x = torch.where(grey, x.mean(dim=1, keepdim=True).expand_as(x), x)
    blur = torch.rand(b, 1, 1, 1, device=dev) < 0.5
    x = torch.where(blur, F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False), x)
    return x + 0.05 * torch.randn_like(x)


def cutmix_boxes(b: int, h: int, w: int, device: torch.device, p: float = 0.5) -> torch.Tensor:
    """Boolean (B, H, W): a random box (a quarter to half of the side) per sample, with probability p."""
    boxes = torch.zeros(b, h, w, dtype=torch.bool, device=device)
    for i in range(b):
        if torch.rand(()) > p:
            continue
        bh, bw = int(h * torch.empty(()).uniform_(0.25, 0.5)), int(w * torch.empty(()).uniform_(0.25, 0.5))
        y, x = int(torch.randint(0, h - bh + 1, ())), int(torch.randint(0, w - bw + 1, ()))
        boxes[i, y : y + bh, x : x + bw] = True
    return boxes


def mix(a: torch.Tensor, boxes: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Paste, inside each sample's box, the pixels of sample ``perm[i]`` ((B,C,H,W) stacks or (B,H,W) maps).

    Coarser stacks (teacher features on a strided grid) get the boxes resampled to their grid.
    """
    if a.shape[-2:] != boxes.shape[-2:]:
        boxes = F.interpolate(boxes[:, None].float(), size=a.shape[-2:], mode="nearest")[:, 0].bool()
    mask = boxes if a.dim() == 3 else boxes[:, None]
    return torch.where(mask, a[perm], a)


def strong_mix(batch: Batch) -> Batch:
    """A strong view: CutMix across the batch (every entry alike), then photometric changes to the image."""
    b, _, h, w = batch["image"].shape
    boxes = cutmix_boxes(b, h, w, batch["image"].device)
    perm = torch.randperm(b, device=boxes.device)
    out = {key: mix(value, boxes, perm) for key, value in batch.items()}
    out["image"] = strong(out["image"])
    return out
