"""Frozen linear paths: a convex fit whose logits a model adds to its own.

Why: on ~43 training patients a logistic regression on the mean of the raw patch features
(its penalty chosen on validation) beat every attention model trained by gradient descent
where the label's signal is weak and spread over many patches (issue 13: `weak` regime,
probe 0.94-0.97 AUC, teacher 0.82-0.90). A model with probes adds their logits to its own
at every magnification: its prediction is the product of the experts (its attention and the
probes), each trained on its own. The probes are fitted outside gradient descent
(training/probes.py) and stored as buffers: no optimiser moves them, the checkpoint carries
them. Unfitted (all zeros) a probe adds nothing.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from napari_dismm.errors import DataError


class FrozenProbe(nn.Module):
    """logits = ((x - mean) / scale) @ weight.T + bias, every term a buffer."""

    def __init__(self, n_in: int, n_outputs: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_in))
        self.register_buffer("scale", torch.ones(n_in))
        self.register_buffer("weight", torch.zeros(n_outputs, n_in))
        self.register_buffer("bias", torch.zeros(n_outputs))

    def forward(self, x: Tensor) -> Tensor:
        return ((x - self.mean) / self.scale) @ self.weight.T + self.bias

    @torch.no_grad()
    def set_fit(self, *, mean: np.ndarray, scale: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> None:
        """Load a fit (numpy arrays of the buffers' shapes)."""
        for name, value in (("mean", mean), ("scale", scale), ("weight", weight), ("bias", bias)):
            buffer = getattr(self, name)
            value = torch.as_tensor(np.asarray(value), dtype=buffer.dtype)
            if value.shape != buffer.shape:
                raise DataError(f"probe {name} has shape {tuple(value.shape)}, expected {tuple(buffer.shape)}")
            buffer.copy_(value)


def masked_mean(bag: Tensor, mask: Tensor | None) -> Tensor:
    """(B, N, D) bag -> (B, D) mean over its real patches (``mask`` (B, N), True = real)."""
    if mask is None:
        return bag.mean(dim=1)
    w = mask.to(bag.dtype).unsqueeze(-1)
    return (bag * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def pooled_magnifications(bags: dict[str, Tensor], masks: dict[str, Tensor] | None, magnifications: tuple[str, ...],
                          probe: FrozenProbe) -> Tensor:
    """(B, M x D) the mean patch features of each magnification, concatenated in order; a
    magnification the batch lacks, or a slide has no patch at, takes the probe's training
    mean, so it adds nothing."""
    batch = next(iter(bags.values())).shape[0]
    width = probe.mean.shape[0] // len(magnifications)
    parts = []
    for i, mag in enumerate(magnifications):
        fill = probe.mean[i * width:(i + 1) * width].expand(batch, width)
        if mag not in bags:
            parts.append(fill)
            continue
        mask = None if masks is None else masks.get(mag)
        mean = masked_mean(bags[mag], mask)
        if mask is not None:
            mean = torch.where(mask.any(dim=1, keepdim=True), mean, fill.to(mean.dtype))
        parts.append(mean)
    return torch.cat(parts, dim=-1)


def own_outputs(model: nn.Module) -> dict[str, bool]:
    """The forward keyword that gives a model's own outputs, without its probes ({} for a
    model without them, or a wrapper around one: DDP's ``module``)."""
    inner = getattr(model, "module", model)
    return {"with_probes": False} if getattr(getattr(inner, "config", None), "probes", False) else {}
