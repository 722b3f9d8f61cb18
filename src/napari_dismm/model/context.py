"""Spatial context for patch tokens: the mean of each patch's neighbours on the real lattice.

Why: a patch's own features are noisy evidence of its tissue type, and tissue comes in
regions, so the teacher looks at each patch together with the 3 x 3 block of patches
around it (what the reference's deformable attention does on its fake 50 x 50 grid; here
on the real level-0 coordinates, so token order never matters). On the planted cohort
this took the teacher's held-out tumor / TME attention AUROC from 0.868 / 0.901 and
0.841 / 0.838 (cohort seeds 1 and 2, where it was chosen) to 0.912 / 0.964 and
0.907 / 0.883, and from 0.897 / 0.907 to 0.944 / 0.952 on the test cohort (seed 0).
The price: a structure of a single patch is diluted by its neighbours.

Neighbours are found by hashing lattice cells of the patch size (sorted keys and
``searchsorted``: O(N log N), nothing of size N x N). With an overlapping tiling several
patches share a cell; each neighbouring cell then contributes one of them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lattice_neighbour_mean", "magnification_number", "with_context"]

_OFFSETS = [(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def magnification_number(name: str) -> float:
    """20.0 for "20x" (the patch size at a magnification scales as 1 / magnification)."""
    try:
        value = float(str(name).strip().lower().removesuffix("x"))
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"magnification {name!r} is not a number like '20x'")
    return value


def lattice_neighbour_mean(tokens: Tensor, coords: Tensor, *, step: float) -> Tensor:
    """(n, d) mean of each token and its up to 8 lattice neighbours, for one bag.

    ``coords`` (n, 2) level-0 top-left x, y; ``step`` the patch size in level-0 pixels."""
    n = tokens.shape[0]
    if n == 0:
        return tokens
    c = coords.to(torch.float64)
    cells = torch.round((c - c.amin(dim=0)) / step).long() + 1  # >= 1, so offsets stay >= 0
    span = int(cells.max()) + 2
    key = cells[:, 1] * span + cells[:, 0]
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    total = torch.zeros_like(tokens)
    count = tokens.new_zeros(n, 1)
    for dx, dy in _OFFSETS:
        wanted = (cells[:, 1] + dy) * span + cells[:, 0] + dx
        pos = torch.searchsorted(sorted_key, wanted).clamp(max=n - 1)
        found = (sorted_key[pos] == wanted)[:, None]
        total = total + torch.where(found, tokens[order[pos]], torch.zeros_like(tokens))
        count = count + found.to(tokens.dtype)
    return total / count  # count >= 1: every patch finds itself


def with_context(tokens: Tensor, coords: Tensor, mask: Tensor | None, *, step: float, weight: float) -> Tensor:
    """(B, N, d) tokens mixed with their neighbourhood: (1 - weight) t_i + weight * mean.

    Padding (``mask`` False) is neither a neighbour nor changed."""
    if weight == 0:
        return tokens
    rows = []
    for b in range(tokens.shape[0]):
        valid = torch.arange(tokens.shape[1], device=tokens.device) if mask is None else mask[b].nonzero().squeeze(1)
        own = tokens[b].index_select(0, valid)
        mean = lattice_neighbour_mean(own, coords[b].index_select(0, valid), step=step)
        rows.append(tokens[b].index_copy(0, valid, (1 - weight) * own + weight * mean))
    return torch.stack(rows)
