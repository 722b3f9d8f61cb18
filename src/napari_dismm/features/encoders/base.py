"""The Encoder: a patch model plus everything needed to feed it and to record it.

Extraction code only ever sees this object: it hands over uint8 RGB patches as read
from the slide and gets float32 features back; normalisation, resizing, device and
precision are the encoder's business, and `weights_hash` goes into the feature file so
features from different weights are never mixed unknowingly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
RANDOM_WEIGHTS_HASH = "random-init"


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA when present; anything else is taken literally (default CPU)."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def precision_for(device: torch.device) -> torch.dtype:
    """Half precision autocast on GPUs (bfloat16 where supported), full precision on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass(eq=False)
class Encoder:
    """A ready-to-run patch encoder (model in eval mode on `device`).

    `model(x)` maps a normalised (B, 3, input_size, input_size) float tensor to
    (B, dim) features; `encode` does the whole uint8 -> feature path.
    """

    name: str
    model: nn.Module
    dim: int
    weights_hash: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        self.model.eval().requires_grad_(False)
        self.model.to(self.device)
        self._mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 RGB -> (B, 3, S, S) normalised float32 on the encoder's device.

        Patches are resized (bilinear, antialiased, in torch) only when not already S x S.
        """
        x = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a numpy array or tensor of patches, got {type(batch).__name__}")
        if x.dtype != torch.uint8:
            raise TypeError(f"expected uint8 RGB patches, got dtype {x.dtype}")
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected patches shaped (B, H, W, 3), got {tuple(x.shape)}")
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        size = self.input_size
        if x.shape[0] and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self._mean) / self._std

    def encode(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 RGB -> (B, dim) float32 features on the CPU."""
        x = self.preprocess(batch)
        if x.shape[0] == 0:
            return torch.empty(0, self.dim, dtype=torch.float32)
        with torch.inference_mode():
            if self.device.type == "cuda" and self.precision != torch.float32:
                with torch.autocast("cuda", dtype=self.precision):
                    out = self.model(x)
            else:
                out = self.model(x)
        return out.float().cpu()

    def __repr__(self) -> str:
        return (
            f"Encoder(name={self.name!r}, dim={self.dim}, input_size={self.input_size}, "
            f"weights_hash={self.weights_hash!r}, device={str(self.device)!r}, precision={self.precision})"
        )
