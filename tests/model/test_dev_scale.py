"""DEV does not grow with the bag (issue 14): the same pair of maps costs the same at 1k and
at 50k 20x patches, and consistent maps cost ~0 at any size."""

from __future__ import annotations

import math

import pytest
import torch

from napari_dismm.model.losses import dev_loss, dev_term

FP10 = 448


def _slide(n10: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A square slide of n10 x n10 10x patches and their 20x children; returns coords and
    the positions (in [0, 1]) of the patch centres, so a map is a field over the slide."""
    ij = torch.stack(torch.meshgrid(torch.arange(n10), torch.arange(n10), indexing="xy"), -1).reshape(-1, 2)
    c10 = ij * FP10
    quarters = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]]) * (FP10 // 2)
    c20 = (c10[:, None] + quarters[None]).reshape(-1, 2)
    extent = float(n10 * FP10)
    return c10, c20, (c10 + FP10 / 2) / extent, (c20 + FP10 / 4) / extent


def _field(u: torch.Tensor, phase: float) -> torch.Tensor:
    return 2.0 * torch.sin(2 * math.pi * (u[:, 0] + phase)) * torch.cos(math.pi * u[:, 1])


def _maps(n10: int, *, consistent: bool, noise: float = 0.0, seed: int = 0):
    """Two slides; 10x maps either the pooled 20x maps (consistent) or a field of their own."""
    gen = torch.Generator().manual_seed(seed)
    c10, c20, u10, u20 = _slide(n10)
    a10s, a20s = [], []
    for phase in (0.0, 0.3):
        a20 = torch.softmax(_field(u20, phase) + noise * torch.randn(len(u20), generator=gen), 0)
        if consistent:
            a10 = a20.reshape(-1, 4).sum(1)  # children are listed parent by parent
        else:
            a10 = torch.softmax(_field(u10, phase + 0.25) + noise * torch.randn(len(u10), generator=gen), 0)
        a10s.append(a10)
        a20s.append(a20)
    a10, a20 = torch.stack(a10s), torch.stack(a20s)
    return a10, a20, c10.expand(2, -1, -1), c20.expand(2, -1, -1)


def _dev(a10, a20, c10, c20, **kwargs):
    return float(dev_loss({"tumor": a10, "tme": a10}, {"tumor": a20, "tme": a20}, c10, c20, None, None,
                          patch_size_10x_level0=float(FP10), **kwargs))


@pytest.mark.parametrize("n10", [16, 112])  # 1,024 and 50,176 20x patches per slide
def test_consistent_maps_cost_nothing_at_any_bag_size(n10):
    assert _dev(*_maps(n10, consistent=True)) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_the_same_inconsistent_maps_cost_the_same_at_1k_and_50k(noise):
    small = _dev(*_maps(16, consistent=False, noise=noise))
    large = _dev(*_maps(112, consistent=False, noise=noise))
    assert small > 0.05 and large > 0.05  # they are inconsistent: DEV sees it
    assert large == pytest.approx(small, rel=0.15)
    assert small <= 4.0  # the agreement form: mean over slides and subspaces of (1 - r)^2


def test_new_scale_is_the_old_divided_by_two_times_1e4():
    """For a weight chosen before issue 14 (sum of the subspaces' terms at scale 1e4):
    w_new = 2e4 x w_old gives the same loss."""
    a10, a20, c10, c20 = _maps(16, consistent=False, noise=0.5)
    new = _dev(a10, a20, c10, c20)
    pooled = a20.reshape(2, -1, 4).sum(-1)
    old = 2 * float(dev_term(a10, pooled, scale=1e4))
    assert old == pytest.approx(2e4 * new, rel=1e-4)
