"""Attentional pooling: learned queries attend over a ViT's tokens (CoCa / CONCH style).

CONCH v1.5's patch feature is not a token of its ViT but one learned query attending over
all of them (keys and values from the layer-normed tokens, the query layer-normed too),
projected and layer-normed. timm has no such layer; this one is ours, with the parameter
names of the published checkpoint (``query``, ``ln_q``, ``ln_k``, ``to_q``, ``to_kv``,
``to_out``) so the file loads by renaming only its prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class AttentionalPooler(nn.Module):
    """(B, N, context_dim) tokens -> (B, n_queries, d_model)."""

    def __init__(self, *, d_model: int, context_dim: int, heads: int, n_queries: int = 1) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.to_q(self.ln_q(self.query)).expand(tokens.shape[0], -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))
