"""The traditional semi-supervised baseline: the student network alone, trained UniMatch-style.

Weak-to-strong consistency with two strong views (photometric + CutMix) and a feature-perturbed view
(dropout on encoder features), the student's own pseudo-labels from the weak view, and the same
confidence weighting and BCE + Dice loss as the SSLKD student, so the comparison isolates the teachers.
With ``align_prior`` its pseudo-labels get the same prior alignment as the SSLKD student's: the threshold is
a running mean (momentum 0.95) of the quantile of each weak-view batch that leaves the labelled masks' road
fraction above it, since its own predictions move as it trains.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import augment
from .data import road_prior
from .losses import pseudo_label, quantile_threshold, seg_loss, shift_prior
from .models import SegModel, build_model
from .trainer import Context, Stage, rampup


class UniMatchStage(Stage):
    name = "student_ssl"
    step_kind = "student"
    uses_unlabelled = True

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.model = build_model(ctx.config.student, ctx.in_channels, ctx.config.weights)
        self.prior = road_prior(ctx.labelled.labels) if ctx.config.align_prior else None
        self.threshold = 0.5

    def state(self) -> dict:
        return {"threshold": self.threshold}

    def load_state(self, state: dict) -> None:
        self.threshold = state.get("threshold", self.threshold)

    def trainable(self) -> dict[str, torch.nn.Module]:
        return {self.name: self.model}

    def outputs(self) -> dict[str, SegModel]:
        return {self.name: self.model}

    def losses(self, lab: dict, unl: Optional[dict]) -> dict[str, torch.Tensor]:
        lab, unl = augment.weak(lab), augment.weak(unl)
        sup = seg_loss(self.model(lab["image"]), lab["label"], lab["valid"])
        weak_img, valid = unl["image"], unl["valid"]
        with torch.no_grad():
            prob = torch.sigmoid(self.model(weak_img))[:, 0]
            if self.prior is not None and valid.any():
                self.threshold = 0.95 * self.threshold + 0.05 * quantile_threshold(prob[valid], self.prior)
                prob = shift_prior(prob, self.threshold)
        fp_logits, _ = self.model.forward_features(weak_img, feature_dropout=0.5)
        target, weight = pseudo_label(prob)
        unsup = 0.5 * seg_loss(fp_logits, target, valid, weight)
        pseudo = {"image": weak_img, "targets": prob[:, None], "valid": valid}
        for _ in range(2):  # two independently perturbed strong views
            view = augment.strong_mix(pseudo)
            t, wt = pseudo_label(view["targets"][:, 0])
            unsup = unsup + 0.25 * seg_loss(self.model(view["image"]), t, view["valid"], wt)
        loss = sup + rampup(self.progress) * self.ctx.config.w_unsup * unsup
        return {"loss": loss, "loss_sup": sup.detach(), "loss_unsup": unsup.detach(),
                "pseudo_threshold": torch.tensor(self.threshold)}
