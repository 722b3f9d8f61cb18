"""Checks on the forward inputs shared by the models, so a wrong bag fails with one line."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from napari_dismm.errors import DataError


def check_bags(
    bags: dict[str, Tensor],
    masks: dict[str, Tensor] | None,
    *,
    magnifications: Sequence[str],
    d_in: int,
) -> list[str]:
    """Return the magnifications present in ``bags`` (in config order); validate shapes."""
    unknown = sorted(set(bags) - set(magnifications))
    if unknown:
        raise DataError(f"bags for unknown magnification(s) {unknown}; model has {list(magnifications)}")
    present = [m for m in magnifications if m in bags]
    if not present:
        raise DataError(f"no bag given; expected one of {list(magnifications)}")
    batch = None
    for mag in present:
        bag = bags[mag]
        if bag.ndim != 3 or bag.shape[-1] != d_in:
            raise DataError(f"bag {mag!r} must be (B, N, {d_in}), got {tuple(bag.shape)}")
        if batch is not None and bag.shape[0] != batch:
            raise DataError(f"bags disagree on batch size: {batch} vs {bag.shape[0]} at {mag!r}")
        batch = bag.shape[0]
        if masks is not None and masks.get(mag) is not None and masks[mag].shape != bag.shape[:2]:
            raise DataError(f"mask {mag!r} must be {tuple(bag.shape[:2])}, got {tuple(masks[mag].shape)}")
    return present


def mask_for(masks: dict[str, Tensor] | None, mag: str) -> Tensor | None:
    """The boolean mask of ``mag`` or None (all patches real)."""
    if masks is None or masks.get(mag) is None:
        return None
    return masks[mag].bool()


def check_genes(genes: dict[str, Tensor] | None, *, widths: dict[str, int], batch: int) -> dict[str, Tensor]:
    """The teacher and late fusion need gene vectors of the configured widths."""
    if genes is None:
        raise DataError("this model needs gene expression (genes={'tumor': ..., 'tme': ...})")
    for name, width in widths.items():
        if name not in genes:
            raise DataError(f"missing gene vector {name!r}")
        if genes[name].shape != (batch, width):
            raise DataError(f"genes[{name!r}] must be ({batch}, {width}), got {tuple(genes[name].shape)}")
    return genes


def bag_steps(footprints: dict[str, Tensor] | None, mag: str, *, batch: int, default: float,
              device: torch.device | str | None = None) -> Tensor:
    """(B,) float64: each bag's patch footprint at ``mag`` in level-0 pixels.

    ``footprints[mag]`` (B,) comes from each bag's feature file (training: ``Batch``;
    prediction: ``predict.py``); where it is absent, NaN or not positive, ``default`` (the
    model's configured footprint) stands in, so old callers and old models keep working."""
    fallback = torch.full((batch,), float(default), dtype=torch.float64, device=device)
    if footprints is None or footprints.get(mag) is None:
        return fallback
    given = torch.as_tensor(footprints[mag]).to(device=fallback.device, dtype=torch.float64).reshape(-1)
    if given.shape != (batch,):
        raise DataError(f"footprints {mag!r} must be ({batch},), one per bag; got {tuple(given.shape)}")
    return torch.where(torch.isfinite(given) & (given > 0), given, fallback)
