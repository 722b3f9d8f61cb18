"""Disentangled multi-modal fusion (DMF): one subspace's cross-attention.

The gene embedding of a subspace asks the patch tokens which of them matter: it is the
query, the patch tokens are keys and values. Attention runs over a set (masked softmax
over the patches), so it does not depend on token order nor on a fake 2-D grid.

The subspace feature is the attention-pooled patches only, with no residual of the gene
query: with one, the head can read the label from the genes and ignore the slide, and the
attention map (what the viewer shows) stops meaning anything. Genes decide *where to look*;
what is seen comes from the patches.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from napari_dismm.errors import ModelConfigError
from napari_dismm.model.layers import masked_softmax


class SubspaceCrossAttention(nn.Module):
    """Gene query (B, d) x patch tokens (B, N, d) -> feature f_u (B, d), attention a_u (B, N).

    Multi-head; the returned per-patch attention is the mean over heads, so it is one
    weight per patch that sums to 1 over the valid patches (0 on padding)."""

    def __init__(self, *, d: int, n_heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if d % n_heads:
            raise ModelConfigError(f"d={d} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.scale = (d // n_heads) ** -0.5
        self.to_q = nn.Linear(d, d, bias=False)
        self.to_kv = nn.Linear(d, 2 * d, bias=False)
        self.to_out = nn.Sequential(nn.Linear(d, d), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(d)

    def forward(self, query: Tensor, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        q = rearrange(self.to_q(query), "b (h e) -> b h e", h=self.n_heads)
        k, v = rearrange(self.to_kv(tokens), "b n (two h e) -> two b h n e", two=2, h=self.n_heads)
        scores = torch.einsum("bhe,bhne->bhn", q, k) * self.scale
        attn = masked_softmax(scores, None if mask is None else mask[:, None, :], dim=-1)
        pooled = rearrange(torch.einsum("bhn,bhne->bhe", attn, v), "b h e -> b (h e)")
        feature = self.norm(self.to_out(pooled))
        return feature, attn.mean(dim=1)
