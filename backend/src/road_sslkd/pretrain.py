"""`road-sslkd pretrain`: encoder weights learnt from the user's own imagery, for machines without a model hub.

Each encoder that a preset's teachers and student use learns to fill in masked square patches of crops from
every raster of the dataset, labelled or not (labels unused), through a LinkNet decoder that is discarded
afterwards: masked image modelling with an L1 loss on the masked pixels only, as SimMIM does. Roads are
long and continuous, so restoring a hidden stretch from its surroundings asks for the context a road
detector needs. The encoders go to ``OUT/<encoder>.pth``, the folder form of the ``weights`` setting, so
``train``, ``bench`` and the plugin start from them with ``--weights OUT``. Every network of a run starts
from the same file, teachers and students, baselines included: the comparison stays fair.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import segmentation_models_pytorch as smp
import torch

from . import events, precision
from .config import Config
from .data import CropSampler, DatasetSpec, Normalizer, Raster, check_raster
from .events import UserError
from .models import REGISTRY
from .pipeline import add_config_arguments, add_data_arguments, config_from_args, dataset_from_args
from .runs import install_stop_handlers, stop_requested
from .trainer import lr_at, pick_device, seed_everything

PATCH = 16  # px; about a road's width at 0.3-0.6 m ground sample distance
MASK_RATIO = 0.6


def masked_view(images: torch.Tensor, patch: int = PATCH,
                ratio: float = MASK_RATIO) -> tuple[torch.Tensor, torch.Tensor]:
    """The images with about ``ratio`` of their ``patch`` squares set to 0 (the normalised mean), and the
    mask (B, 1, H, W), 1 where hidden."""
    b, _, h, w = images.shape
    cells = torch.rand(b, 1, -(-h // patch), -(-w // patch), device=images.device) < ratio
    mask = cells.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., :h, :w].to(images.dtype)
    return images * (1 - mask), mask


def inpainting_loss(prediction: torch.Tensor, images: torch.Tensor, mask: torch.Tensor,
                    valid: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the hidden, valid pixels."""
    weight = mask * valid.unsqueeze(1).to(mask.dtype)
    error = (prediction.float() - images).abs().mean(1, keepdim=True)
    return (error * weight).sum() / weight.sum().clamp(min=1)


def encoders(cfg: Config) -> dict[str, int]:
    """Each encoder the run's networks use, with its depth (the shallowest any of them builds)."""
    depths: dict[str, int] = {}
    for name in (cfg.teacher_a, cfg.teacher_b, cfg.student):
        arch = REGISTRY[name]
        depth = dict(arch.kwargs).get("encoder_depth", 5)
        depths[arch.encoder] = min(depth, depths.get(arch.encoder, depth))
    return depths


def pretrain_encoder(encoder: str, depth: int, sampler: CropSampler, cfg: Config, steps: int, batch: int,
                     device: torch.device) -> tuple[dict[str, torch.Tensor], list[list[float]]]:
    """Train one encoder by inpainting; its state dict and the loss curve ([step, mean loss] per log)."""
    net = smp.Linknet(encoder_name=encoder, encoder_weights=None, encoder_depth=depth,
                      in_channels=len(cfg.bands), classes=len(cfg.bands))
    net.to(device).train().to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    dtype = precision.amp_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    curve, running, t0 = [], 0.0, time.monotonic()
    for step in range(steps):
        if stop_requested():
            raise events.Cancelled(f"pretraining of {encoder} stopped at step {step}/{steps}",
                                   "run the same command again: finished encoders are kept, this one restarts")
        for group in optimiser.param_groups:
            group["lr"] = lr_at(cfg.lr, cfg.warmup, step, steps)
        crops = sampler.sample(batch)
        images, valid = crops["image"].to(device), crops["valid"].to(device)
        flip = torch.rand(images.shape[0], device=device) < 0.5  # a cheap second view of every crop
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        valid = torch.where(flip[:, None, None], valid.flip(-1), valid)
        hidden, mask = masked_view(images)
        with precision.autocast(device, dtype):
            loss = inpainting_loss(net(hidden), images, mask, valid)
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        running += float(loss.detach())
        done = step + 1
        if done % cfg.log_every == 0 or done == steps:
            mean = running / ((done - 1) % cfg.log_every + 1)
            curve.append([done, round(mean, 5)])
            events.metric("loss", mean, stage=f"pretrain_{encoder}", step=done)
            spent = time.monotonic() - t0
            events.progress(f"pretrain_{encoder}", done, steps, eta=spent / done * (steps - done))
            running = 0.0
    return {k: v.detach().cpu() for k, v in net.encoder.state_dict().items()}, curve


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pretrain", help="learn encoder weights from the dataset's own imagery "
                              "(self-supervised), for --weights")
    p.add_argument("--out", type=Path, required=True, help="folder for <encoder>.pth and pretrain.json")
    add_data_arguments(p)
    add_config_arguments(p)
    p.set_defaults(func=_run)


def pretrain(spec: DatasetSpec, cfg: Config, out: Path, command: str = "") -> dict:
    """Pretrain every encoder of ``cfg``'s networks on ``spec``'s labelled and unlabelled images (never its
    test images) into ``out``; encoders a stopped start finished are kept. Returns pretrain.json's record."""
    # As many crops per step as a semi-supervised training step sees.
    steps, batch = cfg.stage_steps("pretrain"), cfg.batch + cfg.batch_unlabelled
    # Each image once: a run without unlabelled rasters uses its labelled ones as the pool (pipeline.train).
    paths = list(dict.fromkeys(Path(p) for p in [x.image for x in spec.labelled] + list(spec.unlabelled)))
    if not paths:
        raise UserError("no imagery", "pass --data DIR, or --unlabelled IMAGE ... and/or --labelled IMAGE:LABEL ...")
    settings = {"steps": steps, "batch": batch, "crop": cfg.crop, "bands": cfg.bands, "seed": cfg.seed,
                "patch": PATCH, "mask_ratio": MASK_RATIO, "rasters": sorted(str(Path(p).resolve()) for p in paths)}
    record_path = out / "pretrain.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is not None and record["settings"] != settings:
        raise UserError(f"{out} holds encoders pretrained with other settings or imagery",
                        "pass another folder, or delete that one")
    record = record or {"command": command, "settings": settings, "encoders": {}}
    foreign = [out / f"{e}.pth" for e in encoders(cfg) if (out / f"{e}.pth").exists() and e not in record["encoders"]]
    if foreign:  # weights this command did not write (a user's own, say): never replaced
        raise UserError(f"{foreign[0]} exists and is not one of this pretraining's encoders (see pretrain.json)",
                        "choose another --out, or move that file away")
    rasters = [Raster(p, cfg.bands) for p in paths]
    for raster in rasters:
        check_raster(raster)
    normalizer = Normalizer.fit(rasters)  # what `train` fits on the same rasters
    device = pick_device(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    for encoder, depth in encoders(cfg).items():
        target = out / f"{encoder}.pth"
        if target.exists() and encoder in record["encoders"]:
            events.log.info("%s already pretrained in %s, kept", encoder, target)
            continue
        seed_everything(cfg.seed)
        sampler = CropSampler(rasters, None, cfg.crop, normalizer, cfg.seed)  # the same crops whatever the order
        events.log.info("pretraining %s: %d steps of %d crops of %d px", encoder, steps, batch, cfg.crop)
        t0 = time.monotonic()
        state, curve = pretrain_encoder(encoder, depth, sampler, cfg, steps, batch, device)
        tmp = target.with_name(target.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(target)
        record["encoders"][encoder] = {"seconds": round(time.monotonic() - t0, 1), "loss": curve}
        record_path.write_text(json.dumps(record, indent=1))
        events.artifact("weights", str(target))
    return record


def _run(args: argparse.Namespace) -> None:
    install_stop_handlers()
    if args.weights not in (None, "none"):
        raise UserError("pretrain starts from random initialisation", "leave out --weights")
    args.weights = "none"
    pretrain(dataset_from_args(args), config_from_args(args), args.out, args.command_line)
    events.emit("done", weights=str(args.out))
