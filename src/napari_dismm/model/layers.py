"""Small building blocks shared by the teacher, the student and the baselines."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def masked_softmax(scores: Tensor, mask: Tensor | None, dim: int = -1) -> Tensor:
    """Softmax that gives exactly 0 to masked-out entries (mask True = keep).

    Masked scores are set to the most negative finite value of the dtype (not -inf), so a
    row with no valid entry gives a finite (uniform) result instead of NaN; we then zero
    the masked entries, so such a row is all zeros."""
    if mask is None:
        return scores.softmax(dim=dim)
    mask = mask.to(torch.bool)
    filled = scores.masked_fill(~mask, -torch.finfo(scores.dtype).max)
    return filled.softmax(dim=dim) * mask.to(scores.dtype)


class PatchEmbedding(nn.Module):
    """Patch feature -> token: Linear + ReLU (+ dropout), as in the reference teacher."""

    def __init__(self, d_in: int, d: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def project(self, x: Tensor) -> Tensor:
        """Linear + ReLU without the dropout: rows can be reordered before `drop`."""
        return self.net[1](self.net[0](x))

    def drop(self, h: Tensor) -> Tensor:
        return self.net[2](h)


class SNN(nn.Module):
    """Self-normalising network for gene vectors: blocks of Linear, ELU, AlphaDropout.

    AlphaDropout keeps the self-normalising mean/variance that plain dropout breaks; the
    Linear layers use LeCun-normal init for the same reason (Klambauer et al., 2017)."""

    def __init__(self, d_in: int, d: int, *, n_blocks: int = 2, dropout: float = 0.25) -> None:
        super().__init__()
        if d_in < 1:
            raise ValueError(f"SNN needs at least one input gene, got d_in={d_in}")
        blocks: list[nn.Module] = []
        width = d_in
        for _ in range(n_blocks):
            blocks += [nn.Linear(width, d), nn.ELU(), nn.AlphaDropout(dropout)]
            width = d
        self.net = nn.Sequential(*blocks)
        for module in self.net:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features**-0.5)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
