"""Registry of segmentation architectures (segmentation-models-pytorch) with features for distillation.

Every model outputs one channel of road logits. ``SegModel.forward_features`` also returns decoder feature
maps: layer 0 is the decoder's output (what the segmentation head reads), layer k the input of the k-th
decoder block from the end (U-Net and LinkNet; each is one step coarser). They are what feature distillation
aligns.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import segmentation_models_pytorch as smp
import torch
from torch import nn

from . import events
from .events import UserError


@dataclass(frozen=True)
class Architecture:
    family: str  # smp class name
    encoder: str
    role: str  # "teacher", "student" or "test"
    kwargs: tuple = ()

    def build(self, in_channels: int, encoder_weights: Optional[str]) -> nn.Module:
        cls = getattr(smp, self.family)
        return cls(
            encoder_name=self.encoder,
            encoder_weights=encoder_weights,
            in_channels=in_channels,
            classes=1,
            **dict(self.kwargs),
        )


REGISTRY: dict[str, Architecture] = {
    # The paper's teacher pair (GPU preset): DeepLabV3+ ResNet-101 and a VGG-16 encoder-decoder.
    "deeplabv3plus-resnet101": Architecture("DeepLabV3Plus", "resnet101", "teacher"),
    "unet-vgg16": Architecture("Unet", "vgg16_bn", "teacher"),
    # CPU-sized teachers: about 5x a student's parameters, with different decoders; both decode to full
    # resolution, which thin roads need (LinkNet is the basis of D-LinkNet, a road-extraction classic).
    "unet-resnet34": Architecture("Unet", "resnet34", "teacher"),
    "linknet-resnet34": Architecture("Linknet", "resnet34", "teacher"),
    "deeplabv3plus-resnet50": Architecture("DeepLabV3Plus", "resnet50", "teacher"),
    "unet-resnet18": Architecture("Unet", "resnet18", "teacher"),
    # Students (4-7 M parameters). LinkNet-MobileNetV2 (the cpu default) decodes to full resolution like
    # the teachers, with 4.4 GFLOPs per 512² tile against DeepLabV3+'s 11.9 (whose decoder stops at 1/4).
    "linknet-mobilenet_v2": Architecture("Linknet", "mobilenet_v2", "student"),
    "deeplabv3plus-mobilenet_v2": Architecture("DeepLabV3Plus", "mobilenet_v2", "student"),
    "unet-mobilenet_v2": Architecture("Unet", "mobilenet_v2", "student"),
    # Test-sized networks for the tiny preset: the same code paths in seconds.
    "tiny-unet": Architecture(
        "Unet", "resnet18", "test", (("encoder_depth", 3), ("decoder_channels", (32, 16, 8)))
    ),
    "tiny-fpn": Architecture(
        "FPN", "resnet18", "test", (("encoder_depth", 3), ("decoder_pyramid_channels", 32),
                                    ("decoder_segmentation_channels", 32))
    ),
    "tiny-student": Architecture(
        "Unet", "mobilenet_v2", "test", (("encoder_depth", 3), ("decoder_channels", (16, 8, 8)))
    ),
}


class SegModel(nn.Module):
    """An smp model that can also return its decoder features."""

    def __init__(self, net: nn.Module, name: str) -> None:
        super().__init__()
        self.net = net
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]

    def forward_features(self, x: torch.Tensor, feature_dropout: float = 0.0,
                         layers: tuple[int, ...] = (0,)) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits at input size and the decoder features of ``layers`` (module docstring); optional dropout
        on the encoder features (UniMatch's feature perturbation)."""
        feats = self.net.encoder(x)
        if feature_dropout > 0:
            feats = [nn.functional.dropout2d(f, feature_dropout, training=True) for f in feats]
        blocks = self._decoder_blocks(max(layers))
        captured: dict[int, torch.Tensor] = {}
        handles = [blocks[-1 - k].register_forward_hook(lambda _m, _i, out, k=k: captured.__setitem__(k, out))
                   for k in set(layers) if k > 0]
        try:
            captured[0] = self.net.decoder(feats)
        finally:
            for handle in handles:
                handle.remove()
        logits = self.net.segmentation_head(captured[0]).float()  # losses and thresholds stay float32 under autocast
        if logits.shape[-2:] != x.shape[-2:]:
            logits = nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits, [captured[k] for k in layers]

    def _decoder_blocks(self, deepest: int) -> nn.ModuleList:
        blocks = getattr(self.net.decoder, "blocks", None)
        count = len(blocks) if isinstance(blocks, nn.ModuleList) else 0
        if deepest >= max(1, count):
            raise UserError(f"{self.name} has no decoder feature layer {deepest}",
                            f"choose feature_layers from 0 to {max(0, count - 1)} for it (0: the map its head reads)")
        return blocks

    def feature_shape(self, layer: int, in_channels: int) -> tuple[int, int]:
        """Channels and stride (input pixels per feature cell) of decoder feature layer ``layer``."""
        was_training = self.training
        self.eval()  # a probe must not move batch-norm statistics
        with torch.no_grad():
            probe = torch.zeros(1, in_channels, 64, 64, device=next(self.parameters()).device)
            features = self.forward_features(probe, layers=(layer,))[1][0]
        self.train(was_training)
        return features.shape[1], 64 // features.shape[-1]


@lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    # One quick probe instead of the hub client's minute of retries on machines without network.
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=3):
            return True
    except OSError:
        return False


def build_model(name: str, in_channels: int = 3, weights: str = "imagenet") -> SegModel:
    """Build a registered model; ``weights`` is "imagenet", "none" or a local state-dict file."""
    if name not in REGISTRY:
        raise UserError(f"unknown architecture '{name}'", f"choose one of: {', '.join(sorted(REGISTRY))}")
    arch = REGISTRY[name]
    encoder_weights = None
    if weights == "imagenet":
        if _hub_reachable():
            encoder_weights = "imagenet"
        else:
            events.warning(
                f"{name}: ImageNet weights cannot be downloaded here (no network); training from random "
                "initialisation. Pass a local weights file (weights setting) for better results."
            )
    model = SegModel(arch.build(in_channels, encoder_weights), name)
    if weights not in ("imagenet", "none"):
        load_weights(model, Path(weights))
    return model


def load_weights(model: SegModel, path: Path) -> None:
    """Load a full model or an encoder state dict; channels that do not fit are reported, not ignored."""
    if not path.is_file():
        raise UserError(f"weights file not found: {path}", "give a .pt/.pth state dict or use weights 'imagenet'")
    state: Any = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    target = model.net.encoder if not any(k.startswith(("encoder.", "net.")) for k in state) else model.net
    state = {k.removeprefix("net."): v for k, v in state.items()}
    result = target.load_state_dict(state, strict=False)
    if len(result.missing_keys) == len(target.state_dict()):
        raise UserError(f"no tensor of {path} matches {model.name}", "check that the file is for this encoder")
    if result.missing_keys:
        events.warning(f"{path.name}: {len(result.missing_keys)} tensors of {model.name} not in the file")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops(model: nn.Module, in_channels: int, size: int = 512) -> float:
    """Forward GFLOPs for one size x size tile (multiply-adds counted as two FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, in_channels, size, size, device=next(model.parameters()).device))
    model.train(was_training)
    return counter.get_total_flops() / 1e9
