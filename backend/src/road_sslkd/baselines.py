"""The traditional semi-supervised baseline: the student network alone, trained UniMatch-style.

Weak-to-strong consistency with two strong views (photometric + CutMix) and a feature-perturbed view
(dropout on encoder features), the student's own pseudo-labels from the weak view, and the same
confidence weighting and BCE + Dice loss as the SSLKD student, so the comparison isolates the teachers.
With ``align_prior`` its pseudo-labels get the same prior alignment as the SSLKD student's: the threshold is
a running mean (momentum 0.95) of the quantile of each weak-view batch that leaves the labelled masks' road
fraction above it, since its own predictions move as it trains.

With ``ssl_gate`` its unsupervised terms wait for ``SelfTrainingGate``: on thin labels a student from random
initialisation predicts no road for hundreds of steps, and its own pseudo-labels would teach it noise
(docs/method.md, "The traditional semi-supervised baseline").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from . import augment
from .data import road_prior
from .losses import margin_over_all_road, pseudo_label, quantile_threshold, seg_loss, shift_prior
from .models import SegModel, build_model
from .trainer import Context, Stage, rampup


@dataclass
class SelfTrainingGate:
    """Weight of self-training terms: 0 until the student beats the all-road prediction on its labelled
    crops (a running mean of ``losses.margin_over_all_road`` above 0), then a ramp-up to 1 from there."""

    margin: float
    start: Optional[float] = None  # stage progress at which the gate opened

    def weight(self, margin: float, progress: float) -> float:
        if self.start is None:
            self.margin = 0.9 * self.margin + 0.1 * margin
            if self.margin <= 0:
                return 0.0
            self.start = progress
        return rampup(progress - self.start)


class UniMatchStage(Stage):
    name = "student_ssl"
    step_kind = "student"
    uses_unlabelled = True

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.model = build_model(ctx.config.student, ctx.in_channels, ctx.config.weights)
        share = road_prior(ctx.labelled.labels)
        self.prior = share if ctx.config.align_prior else None
        self.threshold = 0.5
        # as if the student predicted no road at first
        self.gate = SelfTrainingGate(margin=-share) if ctx.config.ssl_gate else None

    def state(self) -> dict:
        return {"threshold": self.threshold, "gate": self.gate and asdict(self.gate)}

    def load_state(self, state: dict) -> None:
        self.threshold = state.get("threshold", self.threshold)
        if self.gate and state.get("gate"):
            self.gate = SelfTrainingGate(**state["gate"])

    def trainable(self) -> dict[str, torch.nn.Module]:
        return {self.name: self.model}

    def outputs(self) -> dict[str, SegModel]:
        return {self.name: self.model}

    def losses(self, lab: dict, unl: Optional[dict]) -> dict[str, torch.Tensor]:
        lab, unl = augment.weak(lab), augment.weak(unl)
        logits = self.model(lab["image"])
        sup = seg_loss(logits, lab["label"], lab["valid"])
        if self.gate:
            ramp = self.gate.weight(margin_over_all_road(logits.detach(), lab["label"], lab["valid"]), self.progress)
        else:
            ramp = rampup(self.progress)
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
        loss = sup + ramp * self.ctx.config.w_unsup * unsup
        return {"loss": loss, "loss_sup": sup.detach(), "loss_unsup": unsup.detach(),
                "pseudo_threshold": torch.tensor(self.threshold), "unsup_weight": torch.tensor(ramp)}
