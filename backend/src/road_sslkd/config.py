"""Training configuration: presets, overrides from a JSON file, and the resolved config of a run."""

from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .events import UserError


@dataclass
class Config:
    """Every setting of a run; presets fill it, a JSON config file or CLI flags override any field."""

    preset: str = "cpu"
    stages: list[str] = field(
        default_factory=lambda: ["teacher_a", "teacher_b", "teachers_ssl", "student_sslkd"]
    )
    teacher_a: str = "unet-resnet34"
    teacher_b: str = "linknet-resnet34"
    student: str = "linknet-mobilenet_v2"
    # "imagenet", "none", "pretrain" (pretrain.py, on the run's images), a state-dict file or a folder of
    # <encoder>.pth (models.py)
    weights: str = "imagenet"
    bands: list[int] = field(default_factory=lambda: [1, 2, 3])
    label_width: float = 6.0  # road width of vector line labels, in the image CRS's units
    # 2 crops of 256 px (same pixels) scored lower for every model on validation folds: batch diversity over
    # context (docs/benchmarks/cil_road_2016/crop_context.md)
    crop: int = 128
    batch: int = 8
    batch_unlabelled: int = 8
    # Optimiser steps are over batch crops; each rank and micro-step gets batch / (processes x accumulate).
    accumulate: int = 1  # gradient accumulation: a small GPU reaches a preset's batch in several passes
    # Optimisation steps per stage; "steps_scale" multiplies them all (the dock's "training length"). On
    # held-out labelled images (docs/benchmarks/cil_road_2016/): 300-step teachers scored 7.4 points below
    # 600-step ones (teacher_length.md); the SSLKD student gained 5.3-7.2 points at 1200 steps over 600, and
    # 2.1 more from a 300-step cross-model stage (cross_model_length.md). Every student gets the same steps.
    # "pretrain": steps per encoder of `road-sslkd pretrain` (bench --pretrain), crops of a semi-supervised step.
    steps: dict[str, int] = field(
        default_factory=lambda: {"teacher": 600, "teachers_ssl": 300, "student": 1200, "pretrain": 2000}
    )
    steps_scale: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 15
    # Student losses: L = sup + w_prob * prob + w_unsup * pseudo + w_feat * feat (docs/method.md).
    # Which teachers the students learn from: a, b or both (an ensemble). The cpu preset's LinkNet (b) alone
    # led the pair on held-out images in three replicates, a lead inflated by the teachers having seen them;
    # on test it was level, at 29 % less training time (method.md, "One teacher, not the pair").
    student_teachers: list[str] = field(default_factory=lambda: ["b"])
    # Which training of those teachers the SSLKD student learns from: "ssl" (the cross-model teachers, the
    # paper's method) or "warmup" (the supervised teachers, as the KD baseline does, but on the unlabelled
    # pool too). The warm-up ones led by 0.9 points on two validation folds, under the 1 point the rule asked
    # for (benchmarks/cil_road_2016/ablation_warmup_teachers.md).
    sslkd_teachers: str = "ssl"
    # The students' targets average each teacher over 8 flips and rotations (8 passes once per raster): the
    # teachers score higher so, the students gained on 300-step validation but not at 600 steps or on test
    # (method.md, "Teacher outputs are computed once"). The cross-model stage's pseudo-labels stay one pass.
    teacher_tta: bool = True
    w_feat: float = 1.0  # feature distillation from cached teacher features (method.md, "Ablation")
    # Which decoder maps it matches: 0 is the one the head reads, k the input of the k-th block from the end
    # (models.SegModel.forward_features); several are averaged.
    feature_layers: list[int] = field(default_factory=lambda: [0])
    align_prior: bool = True  # pseudo-labels and soft targets call as much road as the labelled masks (method.md)
    # Ship and score each model at the probability that calls as much of the pool road as the labelled masks
    # hold (targets.decision_threshold) instead of 0.5. Off: on held-out labelled images it scored lower than
    # 0.5 (benchmarks/cil_road_2016/threshold_validation.md).
    align_decision: bool = False
    confidence: str = "weight"  # how the student weighs pseudo-labels: one of CONFIDENCE (losses.pseudo_label)
    w_prob: float = 1.0
    w_unsup: float = 1.0
    temperature: float = 2.0
    # The UniMatch-style baseline's self-training waits until the student beats the all-road prediction on its
    # labelled crops (baselines.SelfTrainingGate). Off: it cost the baseline 1.4 IoU points on CIL 2016, but
    # kept it from collapsing on 3 px centreline labels; each benchmark compares SSLKD with the stronger
    # variant (docs/benchmarks/cil_road_2016/self_training_gate.md).
    ssl_gate: bool = False
    w_unsup_teacher: float = 1.0  # cross-model pseudo-label weight for the teachers
    teachers_ssl_lr_scale: float = 1.0  # the cross-model stage's peak learning rate, as a fraction of lr
    # What each teacher learns from on unlabelled crops in the cross-model stage: "mean" (the pair's mean
    # warm-up map, for both) or "partner" (the other's map, as in CPS and the paper). The mean's SSLKD student
    # led on three validation folds, +1.9 (benchmarks/cil_road_2016/pair_mean_pseudo_labels.md).
    teachers_ssl_targets: str = "mean"
    int8: bool = True  # also ship student.int8.onnx (faster, a third less memory) when within 1 IoU point
    tile: int = 256  # evaluation / inference tile
    overlap: int = 25  # percent of the tile
    holdout: int = 0  # labelled images held out for validation curves (0: curves on training images)
    val_every: int = 50
    log_every: int = 10
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"  # --device; a resumed run keeps the one it was given
    amp: bool = True  # mixed precision on CUDA and on CPUs where bfloat16 pays (precision.py); evaluation stays fp32

    def stage_steps(self, kind: str) -> int:
        return max(1, round(self.steps[kind] * self.steps_scale))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


STAGE_NAMES = ("teacher_a", "teacher_b", "teachers_ssl", "student_supervised", "student_ssl", "student_kd",
               "student_sslkd")
CONFIDENCE = ("weight", "threshold", "none")
PRETRAIN = "pretrain"  # the weights setting that pretrains the encoders on the run's own images first
SSLKD_TEACHERS = {"ssl": "_ssl", "warmup": ""}  # sslkd_teachers -> the suffix of the teachers' model names
TEACHERS_SSL_TARGETS = ("partner", "mean")

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a laptop: the same code paths as the real presets, on test-sized networks.
    "tiny": dict(
        teacher_a="tiny-unet", teacher_b="tiny-fpn", student="tiny-student", weights="none",
        crop=64, batch=2, batch_unlabelled=2, steps={"teacher": 6, "teachers_ssl": 4, "student": 6, "pretrain": 4},
        warmup=2, tile=64, val_every=4, log_every=2, checkpoint_every=3,
    ),
    # The 2-core benchmark profile.
    "cpu": dict(),
    # The paper's architectures, cross-model targets and ensemble of both teachers, for a GPU (not measured here).
    "gpu": dict(
        teacher_a="deeplabv3plus-resnet101", teacher_b="unet-vgg16", student_teachers=["a", "b"],
        teachers_ssl_targets="partner",
        crop=384, batch=16, batch_unlabelled=16,
        steps={"teacher": 4000, "teachers_ssl": 8000, "student": 8000, "pretrain": 8000}, tile=512, val_every=500,
        log_every=20, checkpoint_every=500, warmup=200,
    ),
}


def _known(keys: dict[str, Any], source: str) -> None:
    names = {f.name for f in fields(Config)}
    unknown = sorted(set(keys) - names)
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(unknown)} in {source}", f"valid: {', '.join(sorted(names))}")


_TYPES = typing.get_type_hints(Config)


def _fits(value: Any, kind: Any) -> bool:
    """Whether ``value`` has the type ``kind`` of a Config field (a whole number passes for a float, a
    boolean never for a number, and a float must be finite)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if isinstance(value, bool) and kind is not bool:
        return False
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def _check(values: dict[str, Any], source: str) -> None:
    """Known names and values of their field's type: a wrong one fails here, before a run folder exists."""
    _known(values, source)
    for name, value in values.items():
        kind, default = _TYPES[name], getattr(Config(), name)
        if not _fits(value, kind):
            kind_name = kind.__name__ if isinstance(kind, type) else str(kind)
            raise UserError(f"setting {name} in {source} must be {kind_name}, not {json.dumps(value)}",
                            f"e.g. \"{name}\": {json.dumps(default)}")
        if name == "steps" and set(value) - set(default):
            raise UserError(f"unknown step kind(s) {', '.join(sorted(set(value) - set(default)))} in {source}",
                            f"steps has: {', '.join(default)}")
    if "stages" in values:
        check_stages(values["stages"])


def check_stages(stages: list[str]) -> list[str]:
    """``stages`` when it names stages only (at least one), else a UserError naming the others."""
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if unknown or not stages:
        raise UserError(f"unknown stage(s): {', '.join(map(repr, unknown))}" if unknown else "no stage given",
                        f"stages: {', '.join(STAGE_NAMES)}")
    return stages


def make_config(preset: str, config_file: Path | None = None, **overrides: Any) -> Config:
    """Preset, then the JSON file's keys, then explicit overrides (None values are ignored)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}'", f"choose one of: {', '.join(PRESETS)}")
    cfg = replace(Config(), preset=preset, **PRESETS[preset])
    if config_file is not None:
        try:
            data = json.loads(Path(config_file).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read config file {config_file}: {exc}", "give a JSON object of settings") from exc
        if not isinstance(data, dict):
            raise UserError(f"config file {config_file} is not a JSON object", "write {\"setting\": value, ...}")
        _check(data, str(config_file))
        if "steps" in data:
            data["steps"] = {**cfg.steps, **data["steps"]}
        cfg = replace(cfg, **data)
    given = {k: v for k, v in overrides.items() if v is not None}
    _check(given, "the command line")
    cfg = replace(cfg, **given)
    if cfg.confidence not in CONFIDENCE:
        raise UserError(f"unknown confidence '{cfg.confidence}'", f"choose one of: {', '.join(CONFIDENCE)}")
    if cfg.sslkd_teachers not in SSLKD_TEACHERS:
        raise UserError(f"unknown sslkd_teachers '{cfg.sslkd_teachers}'",
                        f"choose one of: {', '.join(SSLKD_TEACHERS)}")
    if cfg.teachers_ssl_targets not in TEACHERS_SSL_TARGETS:
        raise UserError(f"unknown teachers_ssl_targets '{cfg.teachers_ssl_targets}'",
                        f"choose one of: {', '.join(TEACHERS_SSL_TARGETS)}")
    return cfg


# Settings added after runs were first written, with the behaviour of the runs that predate them, so that
# resuming such a run (or reusing its stages in a benchmark) never changes how it trains or is scored.
PREDATED = {"teacher_tta": False, "align_decision": True, "teachers_ssl_targets": "partner"}


def stored_config(data: dict[str, Any], source: str) -> Config:
    """The config saved in a run folder; settings it predates keep their earlier behaviour (PREDATED)."""
    _known(data, source)
    if "steps" in data:  # step kinds added later ("pretrain") get its preset's: no stage of such a run used them
        preset = PRESETS.get(data.get("preset", ""), {})
        data = {**data, "steps": {**preset.get("steps", Config().steps), **data["steps"]}}
    return Config(**{**PREDATED, **data})
