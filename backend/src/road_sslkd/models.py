"""Registry of segmentation architectures (segmentation-models-pytorch) with features for distillation.

Every model outputs one channel of road logits. ``SegModel.forward_features`` also returns decoder feature
maps: layer 0 is the decoder's output (what the segmentation head reads), layer k the input of the k-th
decoder block from the end (U-Net and LinkNet; each is one step coarser). They are what feature distillation
aligns.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import load_file as load_safetensors
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
    # Students (2.5-7 M parameters). LinkNet-MobileNetV2 (the cpu default) decodes to full resolution like
    # the teachers, with 4.4 GFLOPs per 512² tile against DeepLabV3+'s 11.9 (whose decoder stops at 1/4).
    "linknet-mobilenet_v2": Architecture("Linknet", "mobilenet_v2", "student"),
    "deeplabv3plus-mobilenet_v2": Architecture("DeepLabV3Plus", "mobilenet_v2", "student"),
    "unet-mobilenet_v2": Architecture("Unet", "mobilenet_v2", "student"),
    # Plain and grouped convolutions instead of depthwise ones: 0.64-0.79x LinkNet-MobileNetV2's training
    # step on a 2-core CPU at the same ONNX speed, but 12 points lower on held-out images from random
    # initialisation (docs/benchmarks/cil_road_2016/student_choice.md).
    "linknet-regnetx_002": Architecture("Linknet", "tu-regnetx_002", "student"),
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
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(hf_constants.ENDPOINT).hostname or "huggingface.co"  # HF_ENDPOINT names a mirror
    try:
        with socket.create_connection((host, 443), timeout=3):
            return True
    except OSError:
        return False


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


def build_model(name: str, in_channels: int = 3, weights: str = "imagenet") -> SegModel:
    """Build a registered model. ``weights``: "imagenet" (downloaded, or offline from the local Hugging Face
    cache), "none", a state-dict file, or a folder with one file per encoder (``resnet34.pth``,
    ``mobilenet_v2.safetensors``...): a pipeline's teachers and student have different encoders."""
    if name not in REGISTRY:
        raise UserError(f"unknown architecture '{name}'", f"choose one of: {', '.join(sorted(REGISTRY))}")
    arch = REGISTRY[name]
    if weights == "imagenet" and _hub_reachable():
        return SegModel(arch.build(in_channels, "imagenet"), name)
    path = None if weights == "none" else weights_file(arch.encoder, weights)
    if path is None:
        if weights == "imagenet":
            events.warning(
                f"{name}: ImageNet weights cannot be downloaded here (no network) and are not in the local "
                "Hugging Face cache; training from random initialisation. Pass a local weights file or folder "
                f"(weights setting, e.g. a folder with {arch.encoder}.pth) for better results.")
        elif weights != "none":
            events.warning(f"{name}: no {arch.encoder}{{{','.join(WEIGHT_SUFFIXES)}}} in {weights}; training "
                           "its encoder from random initialisation")
        return SegModel(arch.build(in_channels, None), name)
    state = _read_state(path)
    whole = any(k.startswith(("encoder.", "net.")) for k in state)  # a whole model, not an encoder
    model = SegModel(arch.build(in_channels, None), name)
    _load_state(model, state, path, whole)
    return model


def _encoder_names(encoder: str) -> list[str]:
    """File names an encoder's weights may have: smp's name and, for its timm encoders ("tu-x"), timm's."""
    return list(dict.fromkeys((encoder, encoder.removeprefix("tu-"))))


def weights_file(encoder: str, weights: str) -> Optional[Path]:
    """The local file holding ``encoder``'s weights for a ``weights`` setting other than "none", or None."""
    if weights == "imagenet":
        if encoder.startswith("tu-"):  # smp builds these through timm, whose hub repository holds the weights
            cfg = timm.models.get_pretrained_cfg(encoder.removeprefix("tu-"))
            settings = {"repo_id": cfg.hf_hub_id} if cfg is not None and cfg.hf_hub_id else None
        else:
            settings = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {}).get("imagenet")
        if settings is None:
            return None
        if "url" in settings:  # smp before 0.5 downloaded through torch.hub
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(settings["url"]).path).name
            return cached if cached.is_file() else None
        found = try_to_load_from_cache(settings["repo_id"], "model.safetensors", revision=settings.get("revision"))
        return Path(found) if isinstance(found, str) else None
    path = Path(weights)
    if path.is_dir():  # <encoder>.pth, or torchvision's <encoder>-<hash>.pth: its hub cache folder serves as is
        named = [path / f"{n}{s}" for n in _encoder_names(encoder) for s in WEIGHT_SUFFIXES]
        named += sorted(path.glob(f"{encoder}-*.pth"))
        return next((p for p in named if p.is_file()), None)
    if not path.is_file():
        raise UserError(f"weights file or folder not found: {path}",
                        "give 'imagenet', 'none', a state-dict file or a folder of <encoder>.pth files")
    return path


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state: Any = load_safetensors(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: pickle, zip and safetensors errors differ
        raise UserError(f"cannot read weights {path}: {exc}",
                        "give a torch state dict (.pth/.pt) or a .safetensors file") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no state dict", "save one with torch.save(model.state_dict(), path)")
    return state


def _load_state(model: SegModel, state: dict[str, torch.Tensor], path: Path, whole: bool) -> None:
    """Load an encoder's or a whole model's tensors; what does not fit is reported, not ignored."""
    target = model.net if whole else model.net.encoder
    encoder = REGISTRY[model.name].encoder
    hint = (f"give {model.name} a file for its {encoder} encoder, or a folder with one file per encoder "
            f"({encoder}.pth for this model)")
    state = {k.removeprefix("net."): v for k, v in state.items()}
    own = target.state_dict()
    expected = set(own)
    if not whole:
        if all(k.startswith("model.") for k in own) and not any(k.startswith("model.") for k in state):
            state = {f"model.{k}": v for k, v in state.items()}  # a timm file for smp's wrapper of timm
        # Encoder weights are RGB: the first convolution is widened (or summed) to the run's bands, as timm
        # and smp adapt their own pretrained encoders.
        state = {k: timm.models.adapt_input_conv(own[k].shape[1], v) if k in own and v.dim() == 4 and v.shape[1] == 3
                 and own[k].shape[1] != 3 else v for k, v in state.items()}
    if not expected & set(state):
        raise UserError(f"no tensor of {path} fits {model.name}", hint)
    try:
        # smp's encoders drop their classifier's tensors here and return nothing: what is missing is counted below
        target.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors with the right names and the wrong shapes
        raise UserError(f"{path.name} does not fit {model.name}: {str(exc).splitlines()[-1].strip()}", hint) from exc
    expected = {k for k in expected if not k.endswith("num_batches_tracked")}  # older torch files lack them
    missing = expected - set(state)
    if len(missing) > len(expected) / 2:  # a few names in common: the file is for another network
        raise UserError(f"{path.name} holds only {len(expected) - len(missing)} of the {len(expected)} tensors "
                        f"of {model.name}{'' if whole else ' encoder'}: it was saved from another network", hint)
    if missing:
        events.warning(f"{path.name}: {len(missing)} tensors of {model.name} not in the file")
    # Classifier heads are dropped on purpose; other extra tensors mean a deeper sibling (resnet34 as resnet18).
    extra = [k for k in set(state) - set(own) if not {"fc", "classifier", "head", "_fc"} & set(k.split("."))]
    if extra:
        events.warning(f"{path.name}: {len(extra)} of its tensors are not in {model.name} (e.g. {sorted(extra)[0]}): "
                       "is it for a deeper network of the family?")


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
