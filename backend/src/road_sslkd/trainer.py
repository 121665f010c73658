"""The training loop shared by every stage: optimiser, schedule, mixed precision, checkpoints, resume,
clean stop on SIGTERM, progress and metric events, validation curves.

A stage only says which modules it trains and how its loss is computed from a labelled batch and, when it
uses unlabelled data, an unlabelled batch (see teachers.py, baselines.py, distillation.py).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import events
from .config import Config
from .data import CropSampler, Label, LabelledSet, Normalizer, Raster
from .evaluate import evaluate_model
from .models import SegModel
from .runs import RunDir, stop_requested


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise events.UserError("CUDA was asked for but torch sees no GPU", "use --device cpu or install CUDA torch")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Context:
    """What every stage needs: settings, run folder, device, data samplers, validation rasters."""

    config: Config
    run: RunDir
    device: torch.device
    labelled: CropSampler
    unlabelled: Optional[CropSampler]
    normalizer: Normalizer
    val_items: list[tuple[Raster, Label]] = field(default_factory=list)
    val_name: str = "fit_iou"

    @property
    def in_channels(self) -> int:
        return len(self.config.bands)


class Stage:
    """One training stage. ``outputs`` are saved under models/ when the stage finishes."""

    name: str = ""
    step_kind: str = "student"  # which entry of Config.steps sets its length
    uses_unlabelled: bool = False

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.progress = 0.0  # fraction of the stage done, set by the loop (for ramp-ups)

    def trainable(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def outputs(self) -> dict[str, SegModel]:
        raise NotImplementedError

    def losses(self, lab: dict[str, torch.Tensor], unl: Optional[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Loss terms; the key "loss" is the total that is minimised."""
        raise NotImplementedError


def _lr(cfg: Config, step: int, total: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _to(batch: Optional[dict[str, torch.Tensor]], device: torch.device) -> Optional[dict[str, torch.Tensor]]:
    return None if batch is None else {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def rampup(progress: float, length: float = 0.2) -> float:
    """Weight of unsupervised terms: 0 -> 1 over the first ``length`` of a stage (sigmoid-shaped)."""
    if progress >= length:
        return 1.0
    return math.exp(-5.0 * (1.0 - progress / length) ** 2)


def run_stage(stage: Stage, ctx: Context) -> None:
    """Train a stage to the end (resuming from its checkpoint), save its outputs and record timing."""
    cfg, run = ctx.config, ctx.run
    if all(run.has_model(name) for name in stage.outputs()):
        events.log.info("stage %s already finished, skipped", stage.name)
        return
    modules = stage.trainable()
    for module in modules.values():
        module.to(ctx.device).train()
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_amp = cfg.amp and ctx.device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    total = cfg.stage_steps(stage.step_kind)
    start, elapsed = 0, 0.0
    state = run.load_checkpoint(stage.name)
    if state is not None:
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimiser.load_state_dict(state["optimiser"])
        scaler.load_state_dict(state["scaler"])
        ctx.labelled.set_state(state["labelled_rng"])
        if ctx.unlabelled is not None and state.get("unlabelled_rng"):
            ctx.unlabelled.set_state(state["unlabelled_rng"])
        torch.set_rng_state(state["torch_rng"])
        start, elapsed = state["step"], state["elapsed"]
        events.log.info("stage %s resumed at step %d/%d", stage.name, start, total)

    def checkpoint(step: int) -> None:
        run.save_checkpoint(stage.name, {
            "step": step, "elapsed": elapsed + time.monotonic() - t0,
            "modules": {n: m.state_dict() for n, m in modules.items()},
            "optimiser": optimiser.state_dict(), "scaler": scaler.state_dict(),
            "labelled_rng": ctx.labelled.state(),
            "unlabelled_rng": None if ctx.unlabelled is None else ctx.unlabelled.state(),
            "torch_rng": torch.get_rng_state(),
        })

    events.log.info("stage %s: %d steps on %s", stage.name, total, ctx.device)
    t0 = time.monotonic()
    running: dict[str, float] = {}
    for step in range(start, total):
        if stop_requested():
            checkpoint(step)
            raise events.Cancelled(f"stopped during {stage.name} at step {step}/{total}; checkpoint saved")
        for group in optimiser.param_groups:
            group["lr"] = _lr(cfg, step, total)
        lab = _to(ctx.labelled.sample(cfg.batch), ctx.device)
        unl = _to(ctx.unlabelled.sample(cfg.batch_unlabelled), ctx.device) if stage.uses_unlabelled else None
        stage.progress = step / total
        with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=use_amp):
            terms = stage.losses(lab, unl)
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(terms["loss"]).backward()
        scaler.step(optimiser)
        scaler.update()
        for key, value in terms.items():
            running[key] = running.get(key, 0.0) + float(value.detach())
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            n = (done - 1) % cfg.log_every + 1
            means = {key: value / n for key, value in running.items()}
            for key, value in means.items():
                events.metric(key, value, stage=stage.name, step=done)
            run.add_curve_points(stage.name, done, means)
            running.clear()
            spent = time.monotonic() - t0
            events.progress(stage.name, done, total, eta=spent / (done - start) * (total - done))
        if ctx.val_items and (done % cfg.val_every == 0 or done == total):
            model = next(iter(stage.outputs().values()))
            score = evaluate_model(model, ctx.val_items, ctx.normalizer, cfg.tile, cfg.overlap, ctx.device).iou
            events.metric(ctx.val_name, score, stage=stage.name, step=done)
            run.add_curve_points(stage.name, done, {ctx.val_name: score})
        if done % cfg.checkpoint_every == 0 and done < total:
            checkpoint(done)
    seconds = elapsed + time.monotonic() - t0
    for name, model in stage.outputs().items():
        run.save_model(name, model)
        run.update_metrics(name, {"train_seconds": round(seconds, 1)})
    run.checkpoint_path(stage.name).unlink(missing_ok=True)


def build_context(run: RunDir, device: torch.device) -> Context:
    """Open the run's rasters, fit (or reuse) the normaliser, build samplers and the validation set."""
    cfg, spec = run.config, run.dataset
    if not spec.labelled:
        raise events.UserError("no labelled data", "give at least one --labelled IMAGE:LABEL pair or --data DIR")
    holdout = min(cfg.holdout, len(spec.labelled) - 1)
    train_pairs, val_pairs = spec.labelled[holdout:], spec.labelled[:holdout]
    labelled = LabelledSet(train_pairs, cfg.bands, cfg.label_width)
    labelled.require_roads()
    unlabelled = [Raster(p, cfg.bands) for p in spec.unlabelled]
    if run.normalizer is None:
        run.normalizer = Normalizer.fit([r for r, _ in labelled.items] + unlabelled)
        run.save()
    rasters, labels = zip(*labelled.items)
    val_items = LabelledSet(val_pairs, cfg.bands, cfg.label_width).items if val_pairs else labelled.items
    return Context(
        config=cfg, run=run, device=device,
        labelled=CropSampler(list(rasters), list(labels), cfg.crop, run.normalizer, cfg.seed),
        unlabelled=CropSampler(unlabelled, None, cfg.crop, run.normalizer, cfg.seed + 1) if unlabelled else None,
        normalizer=run.normalizer, val_items=val_items, val_name="val_iou" if val_pairs else "fit_iou",
    )
