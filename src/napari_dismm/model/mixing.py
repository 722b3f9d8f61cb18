"""Token mixing over patch tokens at linear cost in the number of patches.

A slide has 10k-200k patches, so dense N x N self-attention is out of the question
(200k tokens -> 160 GB of scores). We use *efficient attention* (Shen et al., 2021):
queries are softmax-normalised over their feature dimension and keys over the tokens,
so attention factorises as ``softmax_feat(Q) @ (softmax_tok(K)^T V)``; the (d_head x
d_head) context is a sum over tokens, which costs O(N d^2) time and O(d^2) memory.

The sum over tokens is accumulated chunk by chunk with a running maximum (the same
rescaling trick as streaming softmax), so peak memory is O(chunk x d) on top of the
(N, d) tokens themselves, with or without autograd. Nothing depends on the token
order: the only position signal is an optional small MLP of the *real* patch
coordinates, normalised per bag.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

__all__ = ["CoordinateEncoding", "EfficientAttention", "MixingBlock", "TokenMixer", "normalise_coords"]


def normalise_coords(coords: Tensor) -> Tensor:
    """Map one bag's (n, 2) level-0 coordinates into [0, 1]^2, keeping the aspect ratio.

    Dividing by the bag's own extent makes the code independent of the slide's size and
    pixel spacing (which the model does not know); it depends only on the set of
    coordinates, not on their order."""
    coords = coords.to(torch.float32)
    if coords.shape[0] == 0:
        return coords
    low = coords.amin(dim=0)
    extent = (coords.amax(dim=0) - low).amax().clamp_min(1.0)
    return (coords - low) / extent


class CoordinateEncoding(nn.Module):
    """A small MLP of normalised (x, y) added to the tokens: position from the slide,
    never from the token's index."""

    def __init__(self, d: int, *, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, unit_coords: Tensor) -> Tensor:
        return self.net(unit_coords)


class EfficientAttention(nn.Module):
    """Multi-head efficient attention over one bag (n, d), accumulated in chunks."""

    def __init__(self, d: int, *, n_heads: int = 4, chunk_size: int = 16384) -> None:
        super().__init__()
        if d % n_heads != 0:
            raise ValueError(f"d={d} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.chunk_size = chunk_size
        self.to_kv = nn.Linear(d, 2 * d, bias=False)
        self.to_q = nn.Linear(d, d, bias=False)
        self.to_out = nn.Linear(d, d)

    def _block_diagonal(self, d: int, device: torch.device) -> Tensor:
        head = torch.arange(d, device=device) // (d // self.n_heads)
        return head[:, None] == head[None, :]

    def context(self, x: Tensor) -> Tensor:
        """(d, d) block-diagonal matrix holding each head's softmax_tok(K)^T V.

        Streamed over chunks of tokens with a per-channel running max m: partial sums are
        rescaled by exp(m_old - m_new) whenever m grows, so no exp overflows and the result
        equals the one-shot softmax. The max is detached (softmax ignores the shift). All
        heads share one (d x d) product and the off-head blocks are dropped: one GEMM beats
        h small ones plus the layout copies on CPU."""
        d = x.shape[-1]
        running_max = x.new_full((d,), -torch.finfo(x.dtype).max)
        denom = x.new_zeros(d)
        numer = x.new_zeros(d, d)
        for part in x.split(self.chunk_size, dim=0):
            k, v = self.to_kv(part).chunk(2, dim=-1)
            new_max = torch.maximum(running_max, k.detach().amax(dim=0))
            rescale = torch.exp(running_max - new_max)
            e = torch.exp(k - new_max)  # (n, d)
            denom = denom * rescale + e.sum(dim=0)
            numer = numer * rescale[:, None] + e.T @ v
            running_max = new_max
        numer = numer * self._block_diagonal(d, x.device)
        return numer / denom.clamp_min(torch.finfo(x.dtype).tiny)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """(n, d) -> (n, d); an empty bag stays empty."""
        if x.shape[0] == 0:
            return x
        ctx = self.context(x)
        n_heads = self.n_heads
        out = []
        for part in x.split(self.chunk_size, dim=0):
            q = rearrange(self.to_q(part), "n (h e) -> n h e", h=n_heads).softmax(dim=-1)
            out.append(self.to_out(rearrange(q, "n h e -> n (h e)") @ ctx))
        return torch.cat(out, dim=0)


class MixingBlock(nn.Module):
    """Pre-norm residual block: x + attn(LN(x)), then x + FFN(LN(x)) (FFN chunked too)."""

    def __init__(
        self, d: int, *, n_heads: int = 4, ffn_mult: int = 2, dropout: float = 0.0, chunk_size: int = 16384
    ) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.norm_attn = nn.LayerNorm(d)
        self.attn = EfficientAttention(d, n_heads=n_heads, chunk_size=chunk_size)
        self.norm_ffn = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Linear(ffn_mult * d, d))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout(self.attn(self.norm_attn(x)))
        out = [
            part + self.dropout(self.ffn(self.norm_ffn(part)))
            for part in x.split(self.chunk_size, dim=0)
        ]
        return torch.cat(out, dim=0) if out else x


class TokenMixer(nn.Module):
    """Coordinate encoding (optional) + a stack of MixingBlocks, one bag at a time.

    ``forward`` takes a padded batch (B, N, d) with a mask and handles each bag on its
    own valid tokens, so padding never enters the key sums; ``mix_bag`` is the one-bag
    entry the student uses to avoid building padded copies of 200k-token bags."""

    def __init__(
        self,
        d: int,
        *,
        n_layers: int = 1,
        n_heads: int = 4,
        ffn_mult: int = 2,
        dropout: float = 0.0,
        use_coords: bool = True,
        chunk_size: int = 16384,
    ) -> None:
        super().__init__()
        self.position = CoordinateEncoding(d) if use_coords else None
        self.blocks = nn.ModuleList(
            MixingBlock(d, n_heads=n_heads, ffn_mult=ffn_mult, dropout=dropout, chunk_size=chunk_size)
            for _ in range(n_layers)
        )

    def mix_bag(self, x: Tensor, *, coords: Tensor | None = None) -> Tensor:
        """(n, d) tokens of one bag (no padding) -> (n, d) mixed tokens."""
        if self.position is not None and coords is not None and x.shape[0] > 0:
            x = x + self.position(normalise_coords(coords).to(x.dtype))
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: Tensor, *, mask: Tensor | None = None, coords: Tensor | None = None) -> Tensor:
        """(B, N, d) -> (B, N, d); padded positions come back as zeros."""
        if mask is None:
            bag_coords = [None if coords is None else coords[b] for b in range(x.shape[0])]
            return torch.stack([self.mix_bag(x[b], coords=bag_coords[b]) for b in range(x.shape[0])])
        out = torch.zeros_like(x)
        for b in range(x.shape[0]):
            keep = mask[b].to(torch.bool)
            bag_coords = None if coords is None else coords[b][keep]
            out[b, keep] = self.mix_bag(x[b][keep], coords=bag_coords)
        return out
