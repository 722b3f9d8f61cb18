"""The Encoder: a patch model plus everything needed to feed it and to record it.

Extraction code only ever sees this object: it hands over uint8 RGB patches as read
from the slide and gets float32 features back; the recipe's pixel pipeline, device and
precision are the encoder's business, and `weights_hash` / `preprocessing` go into the
feature file so features from different weights or pipelines are never mixed unknowingly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .preprocess import Preprocess
from .recipes import IMAGENET_MEAN, IMAGENET_STD

RANDOM_WEIGHTS_HASH = "random-init"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA when present; anything else is taken literally (default CPU)."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def precision_for(device: torch.device, wanted: str = "bf16") -> torch.dtype:
    """The recipe's autocast dtype on a GPU (bfloat16 falls back to float16 where the GPU
    lacks it); always full precision on the CPU."""
    if device.type != "cuda":
        return torch.float32
    dtype = _DTYPES[wanted]
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return torch.float16
    return dtype


CPU_BATCH = 64


def fit_batch(per_patch_bytes: float, free_bytes: float, *, share: float = 0.6, lo: int = 8, hi: int = 1024) -> int:
    """Patches per batch that use ``share`` of the free device memory, in [lo, hi]."""
    if per_patch_bytes <= 0:
        return hi
    return int(min(hi, max(lo, share * free_bytes // per_patch_bytes)))


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
    resize: int | None = None
    interpolation: str = "bilinear"
    output: str = "cls"

    def __post_init__(self) -> None:
        self.model.eval().requires_grad_(False)
        self.model.to(self.device)
        self.pipeline = Preprocess(
            self.input_size, self.resize or self.input_size, self.interpolation, tuple(self.mean), tuple(self.std)
        )

    @property
    def preprocessing(self) -> str:
        """The pixel pipeline and output rule as one stable line (provenance)."""
        return self.pipeline.describe(output=self.output)

    def preprocess(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 RGB -> (B, 3, S, S) normalised float32 on the encoder's device."""
        return self.pipeline(batch, device=self.device)

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

    def batch_size(self, requested: int | None = None) -> int:
        """``requested`` if given; on the CPU 64; on a GPU as many patches as fit in 60 % of
        its free memory, measured with one probe batch of 8 (what the recipe's activations
        cost per patch at its precision)."""
        if requested is not None:
            return requested
        if self.device.type != "cuda":
            return CPU_BATCH
        probe = np.zeros((8, self.input_size, self.input_size, 3), np.uint8)
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.encode(probe)
        per_patch = (torch.cuda.max_memory_allocated(self.device) - base) / 8
        free, _ = torch.cuda.mem_get_info(self.device)
        return fit_batch(per_patch, free)

    def __repr__(self) -> str:
        return (
            f"Encoder(name={self.name!r}, dim={self.dim}, input_size={self.input_size}, "
            f"weights_hash={self.weights_hash!r}, device={str(self.device)!r}, precision={self.precision})"
        )
