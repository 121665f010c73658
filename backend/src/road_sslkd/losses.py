"""Losses for thin, rare roads; every one ignores invalid (nodata) pixels.

Plain BCE lets a road class of a few percent drift to background, so supervised and pseudo-label terms
pair BCE with a soft Dice term, and pseudo-labels are weighted by confidence instead of thresholded.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def _weights(valid: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    w = valid.float()
    return w if weight is None else w * weight


def bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
        weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Binary cross-entropy averaged over valid pixels (optionally weighted per pixel)."""
    w = _weights(valid, weight)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (loss * w).sum() / w.sum().clamp_min(1.0)


def dice(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
         weight: Optional[torch.Tensor] = None, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of the road class over the valid pixels of the whole batch."""
    w = _weights(valid, weight)
    prob = torch.sigmoid(logits)
    inter = (prob * target * w).sum()
    total = (prob * w).sum() + (target * w).sum()
    return 1.0 - (2.0 * inter + eps) / (total + eps)


def seg_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
             weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """BCE + Dice: logits and target (B, H, W) or (B, 1, H, W), target in [0, 1]."""
    logits = logits.reshape(target.shape)
    return bce(logits, target, valid, weight) + dice(logits, target, valid, weight)


def pseudo_label(prob: torch.Tensor, confidence: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-label and its per-pixel weight.

    "weight": |2p - 1| (0 at p = 0.5, 1 when certain), which keeps the rare, less certain road pixels in
    play; "threshold": 1 where p <= 0.1 or p >= 0.9, else 0 (FixMatch-style); "none": 1 everywhere.
    """
    certainty = (2.0 * prob - 1.0).abs()
    if confidence == "threshold":
        certainty = (certainty >= 0.8).float()
    elif confidence == "none":
        certainty = torch.ones_like(prob)
    return (prob > 0.5).float(), certainty


def shift_prior(prob: torch.Tensor, threshold: float) -> torch.Tensor:
    """Probabilities with their logits shifted so that ``threshold`` maps to 0.5.

    Networks trained with BCE + Dice on thin roads call too many pixels road at 0.5 (their precision is well
    below their recall), and pseudo-labels and soft targets pass that bias on, widening the roads a student
    learns. ``threshold`` is chosen so that the shifted targets' road fraction matches the labelled masks'
    (prior alignment; see targets.prior_threshold and baselines.py).
    """
    return torch.sigmoid(torch.logit(prob, eps=1e-3) - math.log(threshold / (1 - threshold)))


def quantile_threshold(prob: torch.Tensor, fraction: float) -> float:
    """The probability above which ``fraction`` of the values lie (at least 1e-3 from 0 and 1)."""
    values = prob.flatten().float()
    k = min(values.numel(), max(1, round(values.numel() * (1 - fraction))))
    return float(values.kthvalue(k).values.clamp(1e-3, 1 - 1e-3))


def margin_over_all_road(logits: torch.Tensor, label: torch.Tensor, valid: torch.Tensor) -> float:
    """Road IoU at 0.5 minus that of calling every valid pixel road (the batch's road share).

    Positive once a network beats the trivial all-road prediction; a network that predicts no road scores
    minus the road share.
    """
    valid = valid.bool()
    pred = (logits.reshape(label.shape) > 0) & valid
    road = (label > 0.5) & valid
    union = (pred | road).sum().clamp_min(1)
    share = road.sum() / valid.sum().clamp_min(1)
    return float((pred & road).sum() / union - share)


def prob_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """Binary KL(teacher || student) of temperature-softened probabilities, scaled by T^2 (Hinton)."""
    t = temperature
    s = student_logits.reshape(valid.shape) / t
    p_t = torch.sigmoid(teacher_logits.reshape(valid.shape) / t)
    # KL for a Bernoulli = BCE(student, p_t) - entropy(p_t); the entropy term has no gradient but keeps
    # the value at 0 when the distributions match, which makes the number readable.
    entropy = F.binary_cross_entropy(p_t, p_t, reduction="none")
    kl = F.binary_cross_entropy_with_logits(s, p_t, reduction="none") - entropy
    w = valid.float()
    return (kl * w).sum() / w.sum().clamp_min(1.0) * t * t


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel L2-normalised (B, C, H, W) features. F.normalize's norm reduces over a strided channel axis,
    which took a third of the feature loss on a CPU; a sum of squares over it is a sum of planes."""
    return x * torch.rsqrt((x * x).sum(1, keepdim=True).clamp_min(1e-24))


def feature_distill(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """MSE between per-pixel L2-normalised features, after resizing the student's to the teacher's grid."""
    # float32 under autocast, and in the teacher's layout: elementwise ops on NHWC and NCHW operands together are slow
    student_feat = student_feat.float().contiguous()
    if student_feat.shape[-2:] != teacher_feat.shape[-2:]:
        student_feat = F.interpolate(student_feat, size=teacher_feat.shape[-2:], mode="bilinear",
                                     align_corners=False)
    diff = _unit(student_feat) - _unit(teacher_feat)
    return (diff * diff).sum() / (student_feat.shape[0] * student_feat.shape[-2] * student_feat.shape[-1])
