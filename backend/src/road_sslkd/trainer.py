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

from . import distributed, events, precision
from .config import Config
from .data import CropSampler, DatasetSpec, Label, LabelledSet, Normalizer, Pair, Raster
from .evaluate import evaluate_model
from .models import SegModel
from .runs import RunDir, stop_requested


def pick_device(name: str) -> torch.device:
    """The torch device for "auto", "cpu", "cuda"...; under torchrun, "cuda" is this rank's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise events.UserError("CUDA was asked for but torch sees no GPU", "use --device cpu or install CUDA torch")
    return distributed.local_device(torch.device(name))


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
    lr_scale: float = 1.0  # peak learning rate as a fraction of the config's lr

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.progress = 0.0  # fraction of the stage done, set by the loop (for ramp-ups)

    def samplers(self) -> tuple[CropSampler, Optional[CropSampler]]:
        """Labelled and unlabelled crop samplers; stages with cached teacher targets return their own."""
        return self.ctx.labelled, self.ctx.unlabelled

    def trainable(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def outputs(self) -> dict[str, SegModel]:
        raise NotImplementedError

    def losses(self, lab: dict[str, torch.Tensor], unl: Optional[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Loss terms; the key "loss" is the total that is minimised."""
        raise NotImplementedError

    def state(self) -> dict:
        """What a stage keeps between steps besides its modules (saved in checkpoints)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore ``state()`` when a stage resumes."""


def lr_at(peak: float, warmup: int, step: int, total: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def batch_to(batch: Optional[dict[str, torch.Tensor]], device: torch.device) -> Optional[dict[str, torch.Tensor]]:
    if batch is None:
        return None
    # Only the networks' input goes NHWC (see run_stage): teacher maps and features in that layout cost a copy
    # each per step and slower elementwise work in the losses (docs/method.md, "The `cpu` preset's budget").
    return {k: v.to(device, non_blocking=True,
                    memory_format=torch.channels_last if k == "image" else torch.preserve_format)
            for k, v in batch.items()}


def _micro_batch(batch: int, cfg: Config) -> int:
    """Crops per rank and micro-step: ``batch`` is per optimiser step, split over ranks and accumulation."""
    if cfg.accumulate < 1:
        raise events.UserError(f"accumulate is {cfg.accumulate}", "set accumulate to 1 (no accumulation) or more")
    parts = cfg.accumulate * distributed.world_size()
    if batch % parts:
        raise events.UserError(
            f"a batch of {batch} does not split into {cfg.accumulate} accumulation step(s) x "
            f"{distributed.world_size()} process(es)",
            f"set batch and batch_unlabelled (--config) to multiples of {parts}, or change accumulate")
    return batch // parts


def rampup(progress: float, length: float = 0.2) -> float:
    """Weight of unsupervised terms: 0 -> 1 over the first ``length`` of a stage (sigmoid-shaped)."""
    if progress >= length:
        return 1.0
    return math.exp(-5.0 * (1.0 - progress / length) ** 2)


def run_stage(stage: Stage, ctx: Context) -> None:
    """Train a stage to the end (resuming from its checkpoint), save its outputs and record timing."""
    cfg, run = ctx.config, ctx.run  # a finished stage is never built (pipeline.train skips it first)
    modules = stage.trainable()
    for module in modules.values():
        # NHWC convolutions are faster on tensor cores and in oneDNN on the CPU (most of all in bfloat16)
        module.to(ctx.device).train().to(memory_format=torch.channels_last)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    dtype = precision.amp_dtype(ctx.device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    total = cfg.stage_steps(stage.step_kind)
    lab_sampler, unl_sampler = stage.samplers()
    start, elapsed = 0, 0.0
    state = run.load_checkpoint(stage.name)
    if state is not None:
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimiser.load_state_dict(state["optimiser"])
        if state["scaler"]:  # empty where the checkpoint was made without float16 (CPU, bfloat16)
            scaler.load_state_dict(state["scaler"])
        rngs = state.get("rank_rngs") or [state]  # per rank when a distributed run saved it
        if distributed.rank() < len(rngs):  # else this rank is new and keeps its own fresh streams
            rng = rngs[distributed.rank()]
            lab_sampler.set_state(rng["labelled_rng"])
            if unl_sampler is not None and rng.get("unlabelled_rng"):
                unl_sampler.set_state(rng["unlabelled_rng"])
            torch.set_rng_state(rng["torch_rng"])
            if ctx.device.type == "cuda" and rng.get("cuda_rng") is not None:  # augmentation and dropout draw there
                torch.cuda.set_rng_state(rng["cuda_rng"], ctx.device)
        stage.load_state(state.get("stage", {}))
        start, elapsed = state["step"], state["elapsed"]
        events.log.info("stage %s resumed at step %d/%d", stage.name, start, total)

    def checkpoint(step: int) -> None:
        rng = {"labelled_rng": lab_sampler.state(),
               "unlabelled_rng": None if unl_sampler is None else unl_sampler.state(),
               "torch_rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None}
        rank_rngs = distributed.gather(rng)  # every rank's streams, so that resumed ranks stay apart
        run.save_checkpoint(stage.name, {
            "step": step, "elapsed": elapsed + time.monotonic() - t0,
            "modules": {n: m.state_dict() for n, m in modules.items()},
            "optimiser": optimiser.state_dict(), "scaler": scaler.state_dict(), "stage": stage.state(), **rng,
            **({"rank_rngs": rank_rngs} if len(rank_rngs) > 1 else {}),
        })
        distributed.barrier()  # no rank stops (and makes torchrun end the others) before the checkpoint is saved

    events.log.info("stage %s: %d steps on %s%s", stage.name, total, ctx.device,
                    f" in mixed precision ({str(dtype).removeprefix('torch.')})" if dtype else "")
    t0 = time.monotonic()
    running: dict[str, float] = {}
    forward = distributed.wrap(modules, stage.losses, ctx.device)
    lab_batch = _micro_batch(cfg.batch, cfg)
    unl_batch = _micro_batch(cfg.batch_unlabelled, cfg) if stage.uses_unlabelled else 0
    for step in range(start, total):
        if distributed.any_rank(stop_requested()):
            checkpoint(step)
            raise events.Cancelled(f"stopped during {stage.name} at step {step}/{total}; checkpoint saved")
        for group in optimiser.param_groups:
            group["lr"] = lr_at(cfg.lr * stage.lr_scale, cfg.warmup, step, total)
        stage.progress = step / total
        optimiser.zero_grad(set_to_none=True)
        for micro in range(cfg.accumulate):  # gradients of the micro-batches add up to the batch's
            lab = batch_to(lab_sampler.sample(lab_batch), ctx.device)
            unl = batch_to(unl_sampler.sample(unl_batch), ctx.device) if stage.uses_unlabelled else None
            with distributed.no_sync(forward, skip=micro < cfg.accumulate - 1):
                with precision.autocast(ctx.device, dtype):
                    terms = forward(lab, unl)
                scaler.scale(terms["loss"] / cfg.accumulate).backward()
            for key, value in terms.items():
                running[key] = running.get(key, 0.0) + float(value.detach()) / cfg.accumulate
        # The sum since the last log turns NaN (or infinite) with the first such step; going on would only
        # save NaN weights. Every rank stops at the same step; the last checkpoint is kept.
        if distributed.any_rank(not math.isfinite(running["loss"])):
            raise events.UserError(
                f"training diverged: the {stage.name} loss is not a finite number at step {step + 1}/{total}",
                'start a new run with a lower learning rate (a --config file with e.g. {"lr": 0.0003}), and '
                "check the rasters for extreme pixel values")
        scaler.step(optimiser)
        scaler.update()
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            n = (done - 1) % cfg.log_every + 1
            means = distributed.mean({key: value / n for key, value in running.items()})
            for key, value in means.items():
                events.metric(key, value, stage=stage.name, step=done)
            run.add_curve_points(stage.name, done, means)
            running.clear()
            spent = time.monotonic() - t0
            events.progress(stage.name, done, total, eta=spent / (done - start) * (total - done))
        if distributed.is_main() and ctx.val_items and (done % cfg.val_every == 0 or done == total):
            model = next(iter(stage.outputs().values()))
            score = evaluate_model(model, ctx.val_items, ctx.normalizer, cfg.tile, cfg.overlap, ctx.device).iou
            events.metric(ctx.val_name, score, stage=stage.name, step=done)
            run.add_curve_points(stage.name, done, {ctx.val_name: score})
        if done % cfg.checkpoint_every == 0 and done < total:
            checkpoint(done)
    distributed.unwrap(forward)
    seconds = elapsed + time.monotonic() - t0
    for name, model in stage.outputs().items():
        run.save_model(name, model)
        run.update_metrics(name, {"train_seconds": round(seconds, 1)})
    if distributed.is_main():
        run.checkpoint_path(stage.name).unlink(missing_ok=True)
    distributed.barrier()  # later stages read these models from the run folder


def split_holdout(cfg: Config, spec: DatasetSpec) -> tuple[list[Pair], list[Pair]]:
    """The labelled pairs a run trains on and the first ``holdout`` ones it validates on (at least one trains)."""
    holdout = min(cfg.holdout, len(spec.labelled) - 1)
    return spec.labelled[holdout:], spec.labelled[:holdout]


def build_context(run: RunDir, device: torch.device) -> Context:
    """Open the run's rasters, fit (or reuse) the normaliser, build samplers and the validation set."""
    cfg, spec = run.config, run.dataset
    if not spec.labelled:
        raise events.UserError("no labelled data", "give at least one --labelled IMAGE:LABEL pair or --data DIR")
    train_pairs, val_pairs = split_holdout(cfg, spec)
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
        labelled=CropSampler(list(rasters), list(labels), cfg.crop, run.normalizer, distributed.rank_seed(cfg.seed)),
        unlabelled=CropSampler(unlabelled, None, cfg.crop, run.normalizer,
                               distributed.rank_seed(cfg.seed + 1)) if unlabelled else None,
        normalizer=run.normalizer, val_items=val_items, val_name="val_iou" if val_pairs else "fit_iou",
    )
