"""MIRROR's encoders: a TransMIL-style slide encoder and a transformer RNA encoder.

Slide encoder (TransMIL layout, our Decisions): patch embedding, a learnable [CLS]
token, a linear-cost attention block, a positional convolution, more attention blocks,
LayerNorm; the slide embedding is the [CLS] output.

- Attention is the efficient attention of :mod:`napari_dismm.model.mixing`, not Nystrom:
  Nystrom's landmarks are means of *consecutive* tokens, so its output depends on the
  order the patches were listed in; efficient attention is exactly permutation-equivariant
  and its [CLS] row is an exact distribution over the tokens (see :func:`cls_attention`).
- The positional convolution (TransMIL's PPEG: depthwise 7x7 + 5x5 + 3x3) runs on the
  slide's *real* patch lattice, built from the coordinates, instead of on a square the
  token list is folded into. Its cost grows with the lattice area, which is capped at a
  few times the number of patches (a sparse or irregular layout is coarsened).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from napari_dismm.errors import DataError
from napari_dismm.model.layers import PatchEmbedding
from napari_dismm.model.mixing import EfficientAttention, MixingBlock

__all__ = ["LatticeConv", "RNAEncoder", "SlideEncoder", "cls_attention", "lattice_cells"]

#: the lattice may hold at most this many cells per patch before it is coarsened
MAX_CELLS_PER_PATCH = 4


def _axis_step(values: Tensor) -> Tensor:
    """Smallest positive gap between distinct values (1 when all are equal)."""
    unique = torch.unique(values)
    gaps = unique[1:] - unique[:-1]
    gaps = gaps[gaps > 0]
    return gaps.min() if gaps.numel() else values.new_ones(())


def lattice_cells(coords: Tensor, *, step: float | None = None) -> tuple[Tensor, tuple[int, int]]:
    """(n, 2) level-0 (x, y) -> ((n, 2) long (row, col) cells, (rows, cols)).

    The step is the bag's patch footprint when given (its feature file's, so a subset of a
    bag and the whole bag share one lattice), else per axis the smallest gap between patch
    positions (the patch grid of a tiled slide); if the lattice would exceed
    ``MAX_CELLS_PER_PATCH`` cells per patch the step grows until it fits. Depends only on
    the set of coordinates, never their order."""
    xy = coords.to(torch.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise DataError(f"coords must be (n, 2), got {tuple(coords.shape)}")
    low = xy.amin(dim=0)
    if step is not None and step > 0:
        step_xy = xy.new_full((2,), float(step))
    else:
        step_xy = torch.stack([_axis_step(xy[:, 0]), _axis_step(xy[:, 1])])
    step = step_xy
    limit = max(MAX_CELLS_PER_PATCH * xy.shape[0], 64)
    while True:
        cells = torch.round((xy - low) / step).long()
        cols, rows = (cells.amax(dim=0) + 1).tolist()
        if rows * cols <= limit:
            return cells[:, [1, 0]], (rows, cols)
        step = step * 2.0


class LatticeConv(nn.Module):
    """PPEG on the real lattice: tokens scattered to their cells (mean where several share
    one), depthwise convolutions summed, read back at each token's cell, added to it."""

    def __init__(self, d: int, *, kernels: tuple[int, ...] = (7, 5, 3)) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(d, d, k, padding=k // 2, groups=d) for k in kernels)

    def forward(self, tokens: Tensor, coords: Tensor, *, step: float | None = None) -> Tensor:
        if tokens.shape[0] == 0:
            return tokens
        cells, (rows, cols) = lattice_cells(coords, step=step)
        flat = cells[:, 0] * cols + cells[:, 1]
        d = tokens.shape[1]
        grid = tokens.new_zeros(rows * cols, d).index_add(0, flat, tokens)
        count = tokens.new_zeros(rows * cols).index_add(0, flat, torch.ones_like(flat, dtype=tokens.dtype))
        grid = (grid / count.clamp_min(1.0)[:, None]).T.reshape(1, d, rows, cols)
        mixed = sum(conv(grid) for conv in self.convs)
        return tokens + mixed.reshape(d, rows * cols).T.index_select(0, flat)


@torch.no_grad()
def cls_attention(attn: EfficientAttention, x: Tensor, *, index: int = 0) -> Tensor:
    """(n, h) weights with which token ``index`` (the [CLS]) attends every token, per head.

    In efficient attention the query row is q = softmax over its head's features and the
    keys are softmax-normalised over the tokens, so the output of head h is
    sum_j a_hj v_j with a_hj = sum_e q_e softmax_j(k_je): an exact distribution over the
    tokens (each column sums to 1), computed chunk by chunk at linear cost."""
    d = x.shape[-1]
    heads = attn.n_heads
    q = rearrange(attn.to_q(x[index : index + 1]), "1 (h e) -> h e", h=heads).softmax(dim=-1)
    running_max = x.new_full((d,), -torch.finfo(x.dtype).max)
    denom = x.new_zeros(d)
    for part in x.split(attn.chunk_size, dim=0):  # pass 1: per-channel max and normaliser
        k = attn.to_kv(part)[:, :d]
        new_max = torch.maximum(running_max, k.amax(dim=0))
        denom = denom * torch.exp(running_max - new_max) + torch.exp(k - new_max).sum(dim=0)
        running_max = new_max
    out = []
    for part in x.split(attn.chunk_size, dim=0):  # pass 2: weights of every token
        soft = torch.exp(attn.to_kv(part)[:, :d] - running_max) / denom
        out.append(torch.einsum("nhe,he->nh", rearrange(soft, "n (h e) -> n h e", h=heads), q))
    return torch.cat(out, dim=0)


class SlideEncoder(nn.Module):
    """One magnification's bag (n, d_in) with coordinates -> [CLS] (d,), tokens (n, d)."""

    def __init__(self, *, d_in: int, d: int, n_layers: int = 2, n_heads: int = 4, dropout: float = 0.1,
                 chunk_size: int = 16384) -> None:
        super().__init__()
        if n_layers < 1:
            raise DataError(f"the slide encoder needs at least one attention layer, got {n_layers}")
        self.embed = PatchEmbedding(d_in, d, dropout=dropout)
        self.cls = nn.Parameter(torch.randn(1, d) * 0.02)
        self.blocks = nn.ModuleList(
            MixingBlock(d, n_heads=n_heads, ffn_mult=2, dropout=dropout, chunk_size=chunk_size) for _ in range(n_layers)
        )
        self.position = LatticeConv(d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, coords: Tensor, *, return_attention: bool = False,
                step: float | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """``attention``: the last block's [CLS] row over the n patches, averaged over heads,
        renormalised without the [CLS] itself (sums to 1); None unless asked for. ``step``:
        the bag's patch footprint in level-0 px (None: read off the coordinates)."""
        if x.shape[0] == 0:
            raise DataError("a slide bag needs at least one patch")
        tokens = torch.cat([self.cls.to(x.dtype), self.embed(x)], dim=0)
        attention = None
        for i, block in enumerate(self.blocks):
            if return_attention and i == len(self.blocks) - 1:
                weights = cls_attention(block.attn, block.norm_attn(tokens)).mean(dim=1)
                attention = weights[1:] / weights[1:].sum().clamp_min(torch.finfo(weights.dtype).tiny)
            tokens = block(tokens)
            if i == 0:  # TransMIL: the positional convolution after the first layer
                tokens = torch.cat([tokens[:1], self.position(tokens[1:], coords, step=step)], dim=0)
        tokens = self.norm(tokens)
        return tokens[0], tokens[1:], attention


class RNAEncoder(nn.Module):
    """Transcript vector (B, G) -> (B, d): an MLP splits it into ``n_tokens`` tokens, a
    [CLS] joins them, dense transformer blocks (few tokens, so dense is cheap) mix them."""

    def __init__(self, *, n_genes: int, d: int, n_tokens: int = 8, n_layers: int = 2, n_heads: int = 4,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.n_tokens = n_tokens
        self.embed = nn.Sequential(nn.Linear(n_genes, n_tokens * d), nn.GELU(), nn.Dropout(dropout))
        self.position = nn.Parameter(torch.randn(n_tokens + 1, d) * 0.02)  # gene chunks have a fixed order
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, n_heads, dim_feedforward=2 * d, dropout=dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d)

    def forward(self, genes: Tensor) -> Tensor:
        tokens = rearrange(self.embed(genes), "b (t d) -> b t d", t=self.n_tokens)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.position
        for layer in self.layers:
            tokens = layer(tokens)
        return self.norm(tokens[:, 0])
