"""Small synthetic batches for the model tests (shared by the MODEL-CORE test files)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor


def pad_bags(bags: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack (N_i, D) bags into (B, N_max, D) with a (B, N_max) mask; padding is noise so
    a model that reads it would show it."""
    n_max = max(b.shape[0] for b in bags)
    out = torch.randn(len(bags), n_max, bags[0].shape[1])
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for i, b in enumerate(bags):
        out[i, : b.shape[0]] = b
        mask[i, : b.shape[0]] = True
    return out, mask


def grid_coords(n: int, size: float, *, seed: int = 0, origin: float = 0.0) -> Tensor:
    """n distinct lattice cells of step ``size`` (level-0 top-left), in random order."""
    g = torch.Generator().manual_seed(seed)
    side = int(n**0.5) + 2
    cells = torch.randperm(side * side, generator=g)[:n]
    return torch.stack([cells % side, cells // side], dim=1).double() * size + origin


def make_batch(
    sizes10: list[int], sizes20: list[int], *, d_in: int, n_tumor: int, n_tme: int, seed: int = 0
) -> dict:
    """A padded two-magnification batch plus the unpadded pieces."""
    torch.manual_seed(seed)
    raw10 = [torch.randn(n, d_in) for n in sizes10]
    raw20 = [torch.randn(n, d_in) for n in sizes20]
    b10, m10 = pad_bags(raw10)
    b20, m20 = pad_bags(raw20)
    genes = {"tumor": torch.randn(len(sizes10), n_tumor), "tme": torch.randn(len(sizes10), n_tme)}
    # lattice coordinates (10x patches of 448 level-0 px, 20x of 224: the teacher's default),
    # padding filled with far-away cells so a model that used it as a neighbour would show it
    raw_coords = {mag: [grid_coords(n, step, seed=seed + i) for i, n in enumerate(sizes)]
                  for mag, step, sizes in (("10x", 448.0, sizes10), ("20x", 224.0, sizes20))}
    coords = {}
    for mag, parts in raw_coords.items():
        padded = torch.full((len(parts), max(len(c) for c in parts), 2), 1e7, dtype=torch.float64)
        for i, c in enumerate(parts):
            padded[i, : len(c)] = c
        coords[mag] = padded
    return {
        "bags": {"10x": b10, "20x": b20},
        "masks": {"10x": m10, "20x": m20},
        "genes": genes,
        "coords": coords,
        "raw": {"10x": raw10, "20x": raw20},
        "raw_coords": raw_coords,
    }


@pytest.fixture
def single_thread():
    """Tiny models run faster on one thread (and do not fight other jobs for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
