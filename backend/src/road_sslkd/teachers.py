"""Teachers: supervised warm-up of each, then cross-model semi-supervised training of the pair.

In the cross-model stage each teacher's hard pseudo-labels on a weak view supervise the other teacher's
prediction on a strong (photometric + CutMix) view, as in CPS but across two different architectures,
whose different inductive biases make their errors less correlated than two copies of one network.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import augment
from .losses import pseudo_label, seg_loss
from .models import SegModel, build_model
from .trainer import Context, Stage


class SupervisedStage(Stage):
    """One network trained on labelled crops only (teacher warm-up, and the supervised student baseline)."""

    step_kind = "teacher"

    def __init__(self, ctx: Context, name: str, arch: str, step_kind: str = "teacher") -> None:
        super().__init__(ctx)
        self.name, self.step_kind = name, step_kind
        self.model = build_model(arch, ctx.in_channels, ctx.config.weights)

    def trainable(self) -> dict[str, torch.nn.Module]:
        return {self.name: self.model}

    def outputs(self) -> dict[str, SegModel]:
        return {self.name: self.model}

    def losses(self, lab: dict, unl: Optional[dict]) -> dict[str, torch.Tensor]:
        lab = augment.weak(lab)
        loss = seg_loss(self.model(lab["image"]), lab["label"], lab["valid"])
        return {"loss": loss}


class CrossModelStage(Stage):
    """Both supervised teachers, trained jointly with each other's pseudo-labels on unlabelled data."""

    name = "teachers_ssl"
    step_kind = "teachers_ssl"
    uses_unlabelled = True

    def __init__(self, ctx: Context, first: str = "teacher_a", second: str = "teacher_b") -> None:
        super().__init__(ctx)
        self.a = ctx.run.load_model(first)
        self.b = ctx.run.load_model(second)
        self.names = (f"{first}_ssl", f"{second}_ssl")

    def trainable(self) -> dict[str, torch.nn.Module]:
        return dict(zip(self.names, (self.a, self.b)))

    def outputs(self) -> dict[str, SegModel]:
        return dict(zip(self.names, (self.a, self.b)))

    def losses(self, lab: dict, unl: Optional[dict]) -> dict[str, torch.Tensor]:
        lab, unl = augment.weak(lab), augment.weak(unl)
        sup = sum(seg_loss(m(lab["image"]), lab["label"], lab["valid"]) for m in (self.a, self.b))
        with torch.no_grad():
            prob_a = torch.sigmoid(self.a(unl["image"]))[:, 0]
            prob_b = torch.sigmoid(self.b(unl["image"]))[:, 0]
        b, _, h, w = unl["image"].shape
        boxes = augment.cutmix_boxes(b, h, w, unl["image"].device)
        perm = torch.randperm(b, device=boxes.device)
        strong = augment.strong(augment.mix(unl["image"], boxes, perm))
        valid = augment.mix(unl["valid"], boxes, perm)
        unsup = unl["image"].new_zeros(())
        # Each teacher learns from the other's pseudo-labels.
        for student, teacher_prob in ((self.a, prob_b), (self.b, prob_a)):
            target, weight = pseudo_label(augment.mix(teacher_prob, boxes, perm))
            unsup = unsup + seg_loss(student(strong), target, valid, weight)
        loss = sup + self.ctx.config.w_unsup_teacher * unsup
        return {"loss": loss, "loss_sup": sup.detach(), "loss_cross": unsup.detach()}
