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
from napari_dismm.model.context import neighbour_mean, neighbour_mean_adjoint, with_context


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


def per_magnification(bags: dict[str, Tensor], masks: dict[str, Tensor] | None, magnifications: tuple[str, ...],
                      fill: Tensor, pool) -> Tensor:
    """(B, M x W): ``pool(index, mag, bag, mask)`` -> (B, W) for each magnification in order;
    a magnification the batch lacks, or a slide has no patch at, takes its part of ``fill``
    (M x W,: the probe's training mean there), so it adds nothing to the probe's logits."""
    batch = next(iter(bags.values())).shape[0]
    width = fill.shape[0] // len(magnifications)
    parts = []
    for i, mag in enumerate(magnifications):
        part = fill[i * width:(i + 1) * width].expand(batch, width)
        if mag not in bags:
            parts.append(part)
            continue
        mask = None if masks is None else masks.get(mag)
        pooled = pool(i, mag, bags[mag], mask)
        if mask is not None:
            pooled = torch.where(mask.any(dim=1, keepdim=True), pooled, part.to(pooled.dtype))
        parts.append(pooled)
    return torch.cat(parts, dim=-1)


def pooled_magnifications(bags: dict[str, Tensor], masks: dict[str, Tensor] | None, magnifications: tuple[str, ...],
                          fill: Tensor) -> Tensor:
    """(B, M x D) the mean patch features of each magnification, concatenated in order
    (``fill``: see ``per_magnification``)."""
    return per_magnification(bags, masks, magnifications, fill, lambda i, mag, x, mask: masked_mean(x, mask))


class MapScorers(nn.Module):
    """Frozen per-patch linear scores, one per magnification and subspace, fitted to the
    teacher's tumor / TME maps (training/map_scorers.py); each slide's patch features, mixed
    with their lattice neighbourhood as the teacher's tokens are (model/context.py), pooled by
    their softmax are what a probe then reads.

    Why: the WSI-only student must find a label that lives in a few patches (planted
    `small_region`: 4 % of the patches) without the genes that guide the teacher's maps. A
    logistic regression on the mean of all patches dilutes such a region 25-fold; the same
    regression on features pooled by a linear score fitted (convex, penalty chosen on
    validation) to the teacher's training maps reads it (held-out figures in the README).
    Unfitted (all zeros) the softmax is uniform: the mean of the mixed features."""

    def __init__(self, n_magnifications: int, d_in: int, *, context: float = 0.0) -> None:
        super().__init__()
        self.context = context
        self.register_buffer("mean", torch.zeros(n_magnifications, d_in))
        self.register_buffer("scale", torch.ones(n_magnifications, d_in))
        self.register_buffer("weight", torch.zeros(n_magnifications, 2, d_in))

    def mixed(self, x: Tensor, coords: Tensor | None, mask: Tensor | None, step: Tensor) -> Tensor:
        """(B, N, D) patch features mixed with their 3 x 3 lattice neighbourhood (weight
        ``context``; ``step`` (B,) each bag's patch footprint); unchanged without coordinates."""
        if not self.context or coords is None:
            return x
        return with_context(x, coords, mask, step=step, weight=self.context)

    def scores(self, x: Tensor, index: int) -> Tensor:
        """(..., N, D) mixed features at magnification ``index`` -> (..., N, 2) scores; the
        standardisation is folded into the weights, so no standardised copy of a bag is made."""
        w = self.weight[index] / self.scale[index]  # (2, D)
        return x @ w.T.to(x.dtype) - (self.mean[index] @ w.T).to(x.dtype)

    @torch.no_grad()
    def set_fit(self, *, mean: np.ndarray, scale: np.ndarray, weight: np.ndarray) -> None:
        for name, value in (("mean", mean), ("scale", scale), ("weight", weight)):
            buffer = getattr(self, name)
            value = torch.as_tensor(np.asarray(value), dtype=buffer.dtype)
            if value.shape != buffer.shape:
                raise DataError(f"map scorer {name} has shape {tuple(value.shape)}, expected {tuple(buffer.shape)}")
            buffer.copy_(value)

    def forward(self, bags: dict[str, Tensor], masks: dict[str, Tensor] | None, magnifications: tuple[str, ...],
                fill: Tensor, *, coords: dict[str, Tensor] | None = None,
                steps: dict[str, Tensor] | None = None) -> Tensor:
        """(B, M x 2 x D): per magnification, the mixed features pooled by the tumor, then
        the TME score; a missing magnification or an empty slide takes its part of ``fill``.
        ``steps[mag]`` (B,) the bags' patch footprints (needed with ``coords`` and context).
        Computed as ``mixed`` then ``scores`` and the pooling would be, without ever holding
        the mixed features: extra memory is (B, N, 2), not a second copy of the bags."""
        def pool(i: int, mag: str, x: Tensor, mask: Tensor | None) -> Tensor:
            where = None if coords is None else coords.get(mag)
            s = self.scores(x, i)  # (B, N, 2) of the unmixed features: mixing is linear, so
            context = self.context if where is not None else 0.0  # mix the scores instead
            if context:
                s = (1 - context) * s + context * neighbour_mean(s, where, mask, step=steps[mag])
            if mask is not None:
                s = s.masked_fill(~mask.bool().unsqueeze(-1), -torch.finfo(s.dtype).max)
            a = s.softmax(dim=1)
            if context:  # sum_i a_i mixed_i = sum_j a'_j x_j: no mixed (B, N, D) copy
                a = (1 - context) * a + context * neighbour_mean_adjoint(a, where, mask, step=steps[mag])
            return torch.einsum("bnk,bnd->bkd", a, x).reshape(x.shape[0], -1)

        return per_magnification(bags, masks, magnifications, fill, pool)


def own_outputs(model: nn.Module) -> dict[str, bool]:
    """The forward keyword that gives a model's own outputs, without its probes ({} for a
    model without them, or a wrapper around one: DDP's ``module``)."""
    inner = getattr(model, "module", model)
    return {"with_probes": False} if getattr(getattr(inner, "config", None), "probes", False) else {}
