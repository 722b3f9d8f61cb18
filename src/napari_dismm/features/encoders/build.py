"""Building a recipe's network with timm, and the output rule that turns tokens into features.

timm provides the architectures (patch 14, registers, SwiGLU, layer scale, TF "same"
padding); what is ours is `PatchModel`: one forward that applies the recipe's output
rule (class token, class token + mean of the patch tokens, or a CNN's global average),
so every recipe maps a normalised (B, 3, S, S) batch to (B, dim) features.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .recipes import Recipe

_LAYERS: dict[str, Any] = {}


def _timm_layer(value: Any) -> Any:
    """Recipe strings -> timm / torch classes (recipes stay plain data)."""
    if not isinstance(value, str):
        return value
    if not _LAYERS:
        import timm.layers

        _LAYERS.update({"swiglu_packed": timm.layers.SwiGLUPacked, "silu": nn.SiLU, "gelu": nn.GELU})
    return _LAYERS.get(value, value)


def timm_kwargs(recipe: Recipe) -> dict[str, Any]:
    """The recipe's timm keyword arguments with layer names resolved to classes."""
    return {k: (_timm_layer(v) if k in ("mlp_layer", "act_layer") else v) for k, v in recipe.kwargs.items()}


class PatchModel(nn.Module):
    """A timm network (``trunk``) plus the recipe's output rule: (B, 3, S, S) -> (B, dim).

    ``pooler`` (output ``"pooler"``, CONCH v1.5): an attentional pooler and a LayerNorm
    over the trunk's tokens; these are weights too, so `loadable` is then the whole model."""

    def __init__(self, trunk: nn.Module, *, output: str, pooler: nn.Module | None = None,
                 pool_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.output = output
        self.pooler = pooler
        self.pool_norm = pool_norm
        self.num_prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 0))

    @property
    def loadable(self) -> nn.Module:
        """The module a weight file is loaded into (its keys are this module's keys)."""
        return self.trunk if self.pooler is None else self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output == "pool":
            maps = self.trunk(x) if isinstance(self.trunk, _FEATURE_NETS) else self.trunk.forward_features(x)
            if isinstance(maps, (list, tuple)):
                maps = maps[-1]
            return maps.mean(dim=(-2, -1))
        tokens = self.trunk.forward_features(x)  # after the final norm
        if self.output == "pooler":
            return self.pool_norm(self.pooler(tokens)[:, 0])
        cls = tokens[:, 0]
        if self.output == "cls":
            return cls
        patches = tokens[:, self.num_prefix_tokens :]  # registers are prefix tokens too
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores of a network that kept its classifier (the ImageNet check of lite0)."""
        return self.trunk(x)


try:  # the features_only wrapper of timm (a CNN returning its feature maps)
    from timm.models._features import FeatureListNet as _FeatureListNet

    _FEATURE_NETS: tuple[type, ...] = (_FeatureListNet,)
except ImportError:  # pragma: no cover - older timm layouts
    _FEATURE_NETS = ()


def build_model(recipe: Recipe, *, device: str | torch.device | None = None, empty: bool = False) -> PatchModel:
    """The recipe's network, randomly initialised (timm's init), on ``device`` (``"meta"``
    builds only the shapes: the full key layout of a 1.1 B-parameter model in milliseconds).

    ``empty=True`` skips the initialisation (tens of seconds for the giants on a CPU) for a
    model whose every parameter and buffer is about to be loaded from a file; networks
    with buffers that no file carries are initialised all the same."""
    import timm

    if empty:
        model = build_model(recipe, device="meta")
        saved = set(model.state_dict())
        if all(name in saved for name, _ in model.named_buffers()):
            return model.to_empty(device=device or "cpu").eval()
    with torch.device(device) if device is not None else nullcontext():
        trunk = timm.create_model(recipe.arch, pretrained=False, **timm_kwargs(recipe))
        if recipe.output != "pooler":
            return PatchModel(trunk, output=recipe.output).eval()
        from .pooler import AttentionalPooler

        pooler = AttentionalPooler(d_model=recipe.dim, context_dim=trunk.embed_dim, heads=recipe.pooler_heads)
        return PatchModel(trunk, output=recipe.output, pooler=pooler, pool_norm=nn.LayerNorm(recipe.dim)).eval()

