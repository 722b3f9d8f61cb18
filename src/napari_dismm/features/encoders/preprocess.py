"""The pixel pipeline of a recipe: uint8 RGB patches -> the normalised tensor its network expects.

Done in torch on the encoder's device, in the order the published pipelines use:
resize the shorter side to ``resize`` (on uint8, antialiased, rounding like an image
library does), centre-crop to ``input_size``, scale to [0, 1], subtract ``mean`` and
divide by ``std``. A patch already at the resize size is not resampled at all, so
224 px patches for a 224 px recipe are normalised exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from .recipes import Recipe


@dataclass(frozen=True)
class Preprocess:
    input_size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, recipe: Recipe) -> Preprocess:
        return cls(recipe.input_size, recipe.resize, recipe.interpolation, tuple(recipe.mean), tuple(recipe.std))

    def describe(self, **extra: object) -> str:
        """A stable one-line record of the pipeline (written beside the features)."""
        return json.dumps(
            {"resize": self.resize, "interpolation": self.interpolation, "crop": self.input_size,
             "mean": list(self.mean), "std": list(self.std), **extra},
            sort_keys=True, separators=(",", ":"),
        )

    def __call__(self, batch: np.ndarray | torch.Tensor, *, device: torch.device) -> torch.Tensor:
        """(B, H, W, 3) uint8 RGB -> (B, 3, S, S) float32 on ``device``."""
        x = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a numpy array or tensor of patches, got {type(batch).__name__}")
        if x.dtype != torch.uint8:
            raise TypeError(f"expected uint8 RGB patches, got dtype {x.dtype}")
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected patches shaped (B, H, W, 3), got {tuple(x.shape)}")
        x = x.to(device, non_blocking=True).permute(0, 3, 1, 2)
        if x.shape[0]:
            x = self._resize_and_crop(x)
        x = x.float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        return (x - mean) / std

    def _resize_and_crop(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        h, w = x.shape[-2:]
        if min(h, w) != self.resize:
            long = max(1, int(self.resize * max(h, w) / min(h, w)))  # torchvision's rule
            size = [self.resize, long] if h <= w else [long, self.resize]
            mode = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
            x = TF.resize(x.contiguous(), size, interpolation=mode, antialias=True)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = TF.center_crop(x, [self.input_size, self.input_size])
        return x
