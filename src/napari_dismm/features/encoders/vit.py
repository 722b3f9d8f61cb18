"""A plain-torch Vision Transformer for the pathology foundation models (UNI, Phikon).

One ViT, two weight layouts: timm's (UNI: ``blocks.N.attn.qkv``, ``ls1.gamma``) is our
own naming; Hugging Face's ``ViTModel`` (Phikon: ``encoder.layer.N.attention.attention.
query`` with separate q, k, v) is translated by `map_hf_keys`. Features are the class
token after the final LayerNorm, as both models are used for slide-level work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from napari_dismm.errors import ModelConfigError

from .weights import StateDict, load_checked, read_state_dict, strip_prefixes


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a ViT; `layer_scale` adds the per-channel gammas UNI was trained with."""

    dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    patch: int = 16
    image_size: int = 224
    layer_scale: bool = False
    eps: float = 1e-6  # timm's value; Phikon's config was corrected to it too


VIT_LARGE_16 = ViTConfig(dim=1024, depth=24, heads=16, layer_scale=True)  # UNI
VIT_BASE_16 = ViTConfig(dim=768, depth=12, heads=12)  # Phikon

# ---------------------------------------------------------------- modules


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, *, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls(attn(norm(x))), then x + ls(mlp(norm(x)))."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        d = config.dim
        self.norm1 = nn.LayerNorm(d, eps=config.eps)
        self.attn = Attention(dim=d, heads=config.heads)
        self.ls1 = LayerScale(d) if config.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=config.eps)
        self.mlp = Mlp(dim=d, hidden=int(d * config.mlp_ratio))
        self.ls2 = LayerScale(d) if config.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, config.dim, config.patch, stride=config.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


class VisionTransformer(nn.Module):
    """(B, 3, S, S) -> (B, dim) class-token features, S fixed by the config."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if config.dim % config.heads or config.image_size % config.patch:
            raise ModelConfigError(f"inconsistent ViT config: {config}")
        self.config = config
        self.dim = config.dim
        n_patches = (config.image_size // config.patch) ** 2
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, config.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim, eps=config.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.config.image_size or x.shape[-2] != self.config.image_size:
            raise ValueError(f"this ViT takes {self.config.image_size} px inputs, got {tuple(x.shape[-2:])}")
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


# ---------------------------------------------------------------- weight layouts

TIMM_ANCHORS = ("patch_embed.", "blocks.", "cls_token", "pos_embed")
HF_ANCHORS = ("embeddings.", "encoder.layer.")
_TIMM_DROPPED = ("head.",)
_HF_DROPPED = ("pooler.", "classifier.", "embeddings.mask_token")

_HF_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
)
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def map_timm_keys(state: StateDict) -> StateDict:
    """timm layout (UNI): our names already; strip wrappers, drop the classifier head."""
    state = strip_prefixes(state, anchors=TIMM_ANCHORS)
    return {k: v for k, v in state.items() if not k.startswith(_TIMM_DROPPED)}


def map_hf_keys(state: StateDict) -> StateDict:
    """Hugging Face ``ViTModel`` layout (Phikon) -> our names; q, k, v fused into qkv."""
    state = strip_prefixes(state, anchors=HF_ANCHORS)
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(_HF_DROPPED):
            continue
        if m := _HF_QKV.match(key):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for pattern, repl in _HF_RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            out[key] = value  # left as is, so the fit check reports it as unexpected
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            missing = sorted({"query", "key", "value"} - set(parts))
            raise ModelConfigError(f"layer {layer} of the weight file lacks attention {kind} for {missing}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def map_vit_keys(state: StateDict) -> StateDict:
    """Detect the layout (Hugging Face or timm) from the keys and map it to ours."""
    if any(k.startswith(HF_ANCHORS) for k in strip_prefixes(state, anchors=HF_ANCHORS)):
        return map_hf_keys(state)
    return map_timm_keys(state)


def build_vit(config: ViTConfig, *, weights: str | Path | None) -> VisionTransformer:
    """A ViT of `config`, loaded from `weights` (timm or HF layout) when given."""
    model = VisionTransformer(config)
    if weights is not None:
        path = Path(weights)
        load_checked(model, map_vit_keys(read_state_dict(path)), source=path.name)
    return model.eval()
