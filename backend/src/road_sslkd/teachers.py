"""Teachers: supervised warm-up of each, then cross-model semi-supervised training of the pair.

In the cross-model stage the warm-up teachers' hard pseudo-labels supervise both teachers' predictions on
a strong (CutMix + photometric) view of unlabelled crops: the pair's mean map for both (the `cpu` default),
or each teacher's map for the other as in CPS (the paper's, `teachers_ssl_targets` "partner"). Two different
architectures make less correlated errors than two copies of one network. The
pseudo-labels are the warm-up teachers' cached whole-raster predictions (targets.py): computed once, they
cost no forward pass per step, which is what lets this stage run on a 2-core CPU. CPS's online pseudo-labels
(each teacher's current prediction on the weak view) scored lower on held-out images (docs/method.md).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import augment
from .data import CropSampler
from .losses import pseudo_label, seg_loss
from .models import SegModel, build_model
from .targets import attach
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

    names = ("teacher_a_ssl", "teacher_b_ssl")

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.a = ctx.run.load_model("teacher_a")
        self.b = ctx.run.load_model("teacher_b")
        self.lr_scale = ctx.config.teachers_ssl_lr_scale  # it starts from trained networks
        self.unlabelled = attach(ctx, ("teacher_a", "teacher_b"), ctx.unlabelled)

    def samplers(self) -> tuple[CropSampler, Optional[CropSampler]]:
        return self.ctx.labelled, self.unlabelled

    def trainable(self) -> dict[str, torch.nn.Module]:
        return dict(zip(self.names, (self.a, self.b)))

    def outputs(self) -> dict[str, SegModel]:
        return dict(zip(self.names, (self.a, self.b)))

    def losses(self, lab: dict, unl: Optional[dict]) -> dict[str, torch.Tensor]:
        lab = augment.weak(lab)
        view = augment.strong_mix(augment.weak(unl))
        sup = sum(seg_loss(m(lab["image"]), lab["label"], lab["valid"]) for m in (self.a, self.b))
        cross = unl["image"].new_zeros(())
        # targets[:, 0] is teacher a's output, targets[:, 1] teacher b's: each learns from the other, or from
        # their mean, whose confidence weight then falls where the two disagree.
        maps = view["targets"]
        if self.ctx.config.teachers_ssl_targets == "mean":
            maps = maps.mean(dim=1, keepdim=True).expand_as(maps)
        for model, other in ((self.a, 1), (self.b, 0)):
            target, weight = pseudo_label(maps[:, other])
            cross = cross + seg_loss(model(view["image"]), target, view["valid"], weight)
        loss = sup + self.ctx.config.w_unsup_teacher * cross
        return {"loss": loss, "loss_sup": sup.detach(), "loss_cross": cross.detach()}
