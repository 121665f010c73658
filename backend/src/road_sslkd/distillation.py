"""The SSLKD student: L = L_sup + w_prob L_prob + w_unsup L_unsup + w_feat L_feat (after Ma et al., 2024).

The frozen teachers (``student_teachers``: one, or several averaged; with ``teacher_tta`` each averaged over
8 flips and rotations) give the targets. On labelled crops
the student learns the labels and the teachers' temperature-softened probabilities; on unlabelled crops it
sees a strong view (CutMix + photometric) and learns the same soft targets plus the teachers'
confidence-weighted hard pseudo-labels.
Teacher outputs and decoder features (for feature distillation: a 1x1 adapter per teacher and
``feature_layers`` entry maps the student's decoder features onto the teacher's) come from the cache of
targets.py, so a step costs two student passes and no teacher pass. Without unlabelled data (``student_kd``)
this is plain distillation.

With ``align_prior`` the teachers' probabilities are shifted (losses.shift_prior) before they become soft
targets or pseudo-labels, so that on each set of rasters (labelled, unlabelled) they call as many pixels road
as the labelled masks hold: the teachers over-predict thin roads and the student would learn their widening.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import augment
from .data import CropSampler
from .losses import feature_distill, prob_distill, pseudo_label, seg_loss, shift_prior
from .models import SegModel, build_model
from .targets import aligned_threshold, attach
from .trainer import Context, Stage


class DistillStage(Stage):
    step_kind = "student"

    def __init__(self, ctx: Context, name: str, teachers: tuple[str, ...], unlabelled: bool) -> None:
        super().__init__(ctx)
        self.name, self.uses_unlabelled = name, unlabelled
        self.student = build_model(ctx.config.student, ctx.in_channels, ctx.config.weights)
        self.layers = tuple(ctx.config.feature_layers) if ctx.config.w_feat > 0 else ()
        tta = ctx.config.teacher_tta
        lab = attach(ctx, teachers, ctx.labelled, self.layers, tta)
        self._samplers = (lab, attach(ctx, teachers, ctx.unlabelled, self.layers, tta) if unlabelled else None)
        # per sampler (labelled, unlabelled): the teachers' probability that becomes 0.5 after the shift
        self.thresholds = [aligned_threshold(ctx, sampler.targets, name, kind) if sampler is not None else 0.5
                           for sampler, kind in zip(self._samplers, ("labelled", "unlabelled"))]
        # one 1x1 adapter per (teacher, layer), in attach's order: the student's layer onto the teacher's
        student_channels = [self.student.feature_shape(k, ctx.in_channels)[0] for k in self.layers]
        self.adapters = nn.ModuleList(
            nn.Conv2d(student_channels[i % len(self.layers)], maps[0].shape[0], 1)
            for i, (_, maps) in enumerate(lab.features)
        )

    def samplers(self) -> tuple[CropSampler, Optional[CropSampler]]:
        return self._samplers

    def trainable(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {self.name: self.student}
        if len(self.adapters):
            modules[f"{self.name}_adapters"] = self.adapters
        return modules

    def outputs(self) -> dict[str, SegModel]:
        return {self.name: self.student}

    def _student(self, view: dict, teacher_prob: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student logits on a view and its distillation terms against the teachers."""
        logits, features = self.student.forward_features(view["image"], layers=self.layers or (0,))
        teacher_logits = torch.logit(teacher_prob, eps=1e-3)
        terms = {"loss_prob": prob_distill(logits, teacher_logits, view["valid"], self.ctx.config.temperature)}
        if len(self.adapters):
            terms["loss_feat"] = sum(feature_distill(a(features[i % len(self.layers)]), view[f"features_{i}"])
                                     for i, a in enumerate(self.adapters)) / len(self.adapters)
        return logits, terms

    def losses(self, lab: dict, unl: Optional[dict]) -> dict[str, torch.Tensor]:
        cfg = self.ctx.config
        lab = augment.weak(lab)
        logits, terms = self._student(lab, shift_prior(lab["targets"].mean(1), self.thresholds[0]))
        terms["loss_sup"] = seg_loss(logits, lab["label"], lab["valid"])
        if self.uses_unlabelled:
            view = augment.strong_mix(augment.weak(unl))
            teacher_prob = shift_prior(view["targets"].mean(1), self.thresholds[1])
            logits_u, terms_u = self._student(view, teacher_prob)
            for key, value in terms_u.items():
                terms[key] = (terms[key] + value) / 2
            target, weight = pseudo_label(teacher_prob, cfg.confidence)
            terms["loss_unsup"] = seg_loss(logits_u, target, view["valid"], weight)
        loss = (terms["loss_sup"] + cfg.w_prob * terms["loss_prob"] + cfg.w_unsup * terms.get("loss_unsup", 0.0)
                + cfg.w_feat * terms.get("loss_feat", 0.0))
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}
