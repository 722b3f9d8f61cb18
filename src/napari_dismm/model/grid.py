"""Pool 20x per-patch values onto the 10x patch grid of the same slide (for DEV).

A 20x patch belongs to the 10x patch that contains its centre, found with the real
level-0 coordinates (never token order). 20x patches whose centre lies in no 10x patch
(the two tissue grids can differ at the border) are dropped: index -1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from napari_dismm.errors import DataError


def _lattice_lookup(c10: Tensor, centres: Tensor, size: float) -> Tensor | None:
    """Fast path when the 10x patches sit on one lattice of step ``size``: hash cells.
    Returns None when they do not (overlapping or irregular grids)."""
    origin = torch.remainder(c10[0], size)
    cells = (c10 - origin) / size
    if not torch.allclose(cells, cells.round(), atol=1e-6):
        return None
    cells = cells.round().long()
    wanted = torch.floor((centres - origin) / size).long()
    low = torch.minimum(cells.amin(0), wanted.amin(0))
    span = torch.maximum(cells.amax(0), wanted.amax(0)) - low + 1
    key10 = (cells[:, 1] - low[1]) * span[0] + (cells[:, 0] - low[0])
    key20 = (wanted[:, 1] - low[1]) * span[0] + (wanted[:, 0] - low[0])
    order = torch.argsort(key10, stable=True)
    sorted_keys = key10[order]
    pos = torch.searchsorted(sorted_keys, key20).clamp(max=len(sorted_keys) - 1)
    found = sorted_keys[pos] == key20
    return torch.where(found, order[pos], torch.full_like(pos, -1))


def _containing_patch(c10: Tensor, centres: Tensor, size: float, chunk: int = 4096) -> Tensor:
    """General path: the first (lowest index) 10x patch whose square contains the centre."""
    result = torch.full((len(centres),), -1, dtype=torch.long)
    n10 = len(c10)
    for start in range(0, len(centres), chunk):
        part = centres[start : start + chunk, None, :]
        inside = ((part >= c10[None]) & (part < c10[None] + size)).all(-1)  # (chunk, N10)
        first = torch.where(inside, torch.arange(n10), n10).amin(dim=1)
        result[start : start + chunk] = torch.where(first < n10, first, -1)
    return result


def _sizes(size: float | Tensor | None, batch: int, name: str) -> Tensor | None:
    """(B,) float64 per-bag sizes from one number or a (B,) tensor (None stays None)."""
    if size is None:
        return None
    sizes = torch.as_tensor(size, dtype=torch.float64).detach().cpu().reshape(-1)
    if sizes.numel() == 1:
        sizes = sizes.expand(batch)
    if sizes.shape != (batch,):
        raise DataError(f"{name} must be one number or one per bag ({batch}), got shape {tuple(sizes.shape)}")
    if not bool((sizes > 0).all()):
        raise DataError(f"{name} must be > 0, got {sizes.tolist()}")
    return sizes


def grid_index_20x_to_10x(
    coords10: Tensor,
    coords20: Tensor,
    masks10: Tensor | None,
    masks20: Tensor | None,
    *,
    patch_size_10x_level0: float | Tensor,
    patch_size_20x_level0: float | Tensor | None = None,
) -> Tensor:
    """(B, N20) long: index of the 10x patch containing each 20x patch's centre, -1 if none
    or padding. Coordinates are level-0 top-left (x, y). Sizes are level-0 patch sides,
    one number or (B,) one per bag (a cohort mixes 0.25 and 0.5 um/px scanners: each bag
    its own footprint); the 20x size defaults to half the 10x one."""
    if coords10.ndim != 3 or coords20.ndim != 3 or coords10.shape[0] != coords20.shape[0]:
        raise DataError(f"coords must be (B, N, 2), got {tuple(coords10.shape)} and {tuple(coords20.shape)}")
    batch, n20 = coords20.shape[:2]
    sizes10 = _sizes(patch_size_10x_level0, batch, "patch_size_10x_level0")
    sizes20 = _sizes(patch_size_20x_level0, batch, "patch_size_20x_level0")
    if sizes20 is None:
        sizes20 = sizes10 / 2
    index = torch.full((batch, n20), -1, dtype=torch.long)
    with torch.no_grad():
        for i in range(batch):
            keep10 = torch.ones(coords10.shape[1], dtype=torch.bool) if masks10 is None else masks10[i].bool().cpu()
            keep20 = torch.ones(n20, dtype=torch.bool) if masks20 is None else masks20[i].bool().cpu()
            valid10 = torch.nonzero(keep10).squeeze(1)
            valid20 = torch.nonzero(keep20).squeeze(1)
            if len(valid10) == 0 or len(valid20) == 0:
                continue
            size10 = float(sizes10[i])
            c10 = coords10[i].cpu().double()[valid10]
            centres = coords20[i].cpu().double()[valid20] + float(sizes20[i]) / 2
            local = _lattice_lookup(c10, centres, size10)
            if local is None:
                local = _containing_patch(c10, centres, size10)
            index[i, valid20] = torch.where(local >= 0, valid10[local.clamp(min=0)], -1)
    return index.to(coords20.device)


def pool_onto_10x(values20: Tensor, index: Tensor, n10: int) -> Tensor:
    """Sum 20x values (B, N20) into their 10x cells: (B, n10). Differentiable in values."""
    keep = index >= 0
    pooled = values20.new_zeros(values20.shape[0], n10)
    return pooled.scatter_add(1, index.clamp(min=0), values20 * keep.to(values20.dtype))
