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


def tissue_modes(n: int, *, d: int = 128, gap: float = 24.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tissue modes of 45 % and 35 % of the bag (unit and 1.1 spread per dimension, means
    ``gap`` apart along a random direction) and 20 % diffuse background (spread 2) around
    the midpoint, in the student's token width; mode B is the less dense. Labels 0 / 1 for the modes, 2 background;
    rows shuffled."""
    gen = torch.Generator().manual_seed(seed)
    n_a, n_b = int(0.45 * n), int(0.35 * n)
    direction = torch.randn(d, generator=gen)
    direction = direction / direction.norm() * gap / 2
    parts = [torch.randn(n_a, d, generator=gen) + direction, 1.1 * torch.randn(n_b, d, generator=gen) - direction,
             2.0 * torch.randn(n - n_a - n_b, d, generator=gen)]
    labels = torch.cat([torch.full((len(p),), i) for i, p in enumerate(parts)])
    order = torch.randperm(n, generator=gen)
    return torch.cat(parts)[order], labels[order]
