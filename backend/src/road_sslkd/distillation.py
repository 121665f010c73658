"""The SSLKD student: L = L_sup + w_feat L_feat + w_prob L_prob + w_unsup L_unsup (Ma et al., 2024).

Two frozen teachers of different architectures form an ensemble. On labelled crops the student learns the
labels and the teachers' features (through a 1x1 adapter per teacher) and temperature-softened
probabilities; on unlabelled crops it sees a strong view and learns the same feature and probability
targets plus the ensemble's confidence-weighted hard pseudo-labels, computed on the weak view.
Without unlabelled data (``student_kd``) it is plain knowledge distillation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import augment
from .losses import feature_distill, prob_distill, pseudo_label, seg_loss
from .models import SegModel, build_model
from .trainer import Context, Stage, rampup


class DistillStage(Stage):
    step_kind = "student"

    def __init__(self, ctx: Context, name: str, teachers: tuple[str, ...], unlabelled: bool) -> None:
        super().__init__(ctx)
        self.name, self.uses_unlabelled = name, unlabelled
        self.student = build_model(ctx.config.student, ctx.in_channels, ctx.config.weights)
        self.teachers = [ctx.run.load_model(t).to(ctx.device).eval() for t in teachers]
        for teacher in self.teachers:
            teacher.requires_grad_(False)
        self.adapters = nn.ModuleList(
            nn.Conv2d(self.student.feature_channels, t.feature_channels, 1) for t in self.teachers
        )

    def trainable(self) -> dict[str, nn.Module]:
        return {self.name: self.student, f"{self.name}_adapters": self.adapters}

    def outputs(self) -> dict[str, SegModel]:
        return {self.name: self.student}

    def _teach(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Ensemble logit (logit of the mean probability) and each teacher's features."""
        with torch.no_grad():
            outs = [t.forward_features(images) for t in self.teachers]
            prob = torch.stack([torch.sigmoid(o[0].float()) for o in outs]).mean(0)
        return torch.logit(prob.clamp(1e-5, 1 - 1e-5)), [o[1] for o in outs]

    def _distill(self, s_logits: torch.Tensor, s_feat: torch.Tensor, t_logits: torch.Tensor,
                 t_feats: list[torch.Tensor], valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.ctx.config
        feat = sum(feature_distill(a(s_feat), f) for a, f in zip(self.adapters, t_feats)) / len(t_feats)
        prob = prob_distill(s_logits, t_logits, valid, cfg.temperature)
        return feat, prob

    def losses(self, lab: dict, unl: Optional[dict]) -> dict[str, torch.Tensor]:
        cfg = self.ctx.config
        lab = augment.weak(lab)
        s_logits, s_feat = self.student.forward_features(lab["image"])
        t_logits, t_feats = self._teach(lab["image"])
        sup = seg_loss(s_logits, lab["label"], lab["valid"])
        feat, prob = self._distill(s_logits, s_feat, t_logits, t_feats, lab["valid"])
        terms = {"loss_sup": sup, "loss_feat": feat, "loss_prob": prob}
        if self.uses_unlabelled:
            unl = augment.weak(unl)
            t_logits, t_feats = self._teach(unl["image"])
            # Photometric-only strong view: pixels stay aligned with the teachers' weak-view targets.
            s_logits, s_feat = self.student.forward_features(augment.strong(unl["image"]))
            feat_u, prob_u = self._distill(s_logits, s_feat, t_logits, t_feats, unl["valid"])
            target, weight = pseudo_label(torch.sigmoid(t_logits)[:, 0])
            terms["loss_feat"] = (feat + feat_u) / 2
            terms["loss_prob"] = (prob + prob_u) / 2
            terms["loss_unsup"] = rampup(self.progress) * seg_loss(s_logits, target, unl["valid"], weight)
        loss = (terms["loss_sup"] + cfg.w_feat * terms["loss_feat"] + cfg.w_prob * terms["loss_prob"]
                + cfg.w_unsup * terms.get("loss_unsup", 0.0))
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}
