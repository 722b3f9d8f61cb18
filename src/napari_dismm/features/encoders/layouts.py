"""Published weight layouts mapped onto timm's parameter names.

Each published file keeps the names of the code that trained it: timm's own (UNI,
Virchow, H-optimus, GigaPath, Kaiko), Hugging Face ``ViTModel`` (Phikon), Hugging Face
DINOv2 with or without registers (Phikon-v2, Hibou), the EfficientNet-Lite0 wheel
(``_blocks.N._depthwise_conv``) or torchvision's ResNet. Mapping is pure renaming plus
two exact rewrites: Hugging Face's separate q, k, v are concatenated into timm's fused
``qkv``, and where timm keeps no position embedding for the class token
(``no_embed_class``) the class token's position embedding is added to the token once
(DINOv2 adds it at every forward; the sum is the same).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from napari_dismm.errors import ModelConfigError

from .weights import StateDict, strip_prefixes

TIMM_VIT_ANCHORS = ("patch_embed.", "blocks.", "cls_token", "pos_embed")
HF_ANCHORS = ("embeddings.", "encoder.layer.")
RESNET_ANCHORS = ("conv1.", "bn1.", "layer1.")
LITE0_WHEEL_ANCHORS = ("_conv_stem.", "_blocks.")
LITE0_TIMM_ANCHORS = ("conv_stem.", "blocks.")
CONCH_ANCHORS = ("trunk.", "attn_pool_contrast.")

_HF_VIT_RENAMES: tuple[tuple[str, str], ...] = (
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
_HF_DINOV2_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.register_tokens$", "reg_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.(fc1|weights_in)\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.mlp\.(fc2|weights_out)\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
)
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")

# EfficientNet-Lite0 blocks per stage (the wheel numbers blocks flat, timm by stage).
LITE0_REPEATS: tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)
_LITE0_TOP = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.", "_bn1.": "bn2.",
              "_fc.": "classifier."}
_LITE0_DS = {"_depthwise_conv.": "conv_dw.", "_bn1.": "bn1.", "_project_conv.": "conv_pw.", "_bn2.": "bn2."}
_LITE0_IR = {"_expand_conv.": "conv_pw.", "_bn0.": "bn1.", "_depthwise_conv.": "conv_dw.", "_bn1.": "bn2.",
             "_project_conv.": "conv_pwl.", "_bn2.": "bn3."}


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """Which published layout a state dict is in (wrapper prefixes allowed)."""
    if any(k.startswith("attn_pool_contrast.") for k in strip_prefixes(dict(state), anchors=CONCH_ANCHORS)):
        return "conch"
    hf = strip_prefixes(dict(state), anchors=HF_ANCHORS)
    if any(k.startswith("encoder.layer.") for k in hf):
        return "hf-vit" if any(".layernorm_before." in k for k in hf) else "hf-dinov2"
    cnn = strip_prefixes(dict(state), anchors=LITE0_WHEEL_ANCHORS + LITE0_TIMM_ANCHORS + RESNET_ANCHORS)
    if any(k.startswith(("_conv_stem.", "conv_stem.")) for k in cnn):
        return "lite0-wheel"
    if any(k.startswith("layer1.") for k in cnn):
        return "resnet"
    return "timm"


LAYOUT_NAMES = {"timm": "timm ViT", "hf-vit": "Hugging Face ViTModel", "hf-dinov2": "Hugging Face DINOv2",
                "lite0-wheel": "EfficientNet-Lite0", "resnet": "ResNet",
                "conch": "CONCH vision tower"}


def to_timm(layout: str, state: StateDict, *, expected: Mapping[str, torch.Tensor],
            drop: tuple[str, ...] = ()) -> StateDict:
    """``state`` (any wrapper prefix) in the names of the timm model whose (meta) state
    dict is ``expected``; keys under ``drop`` and classifier heads the model lacks are left out."""
    if layout == "hf-vit":
        out = _from_hf(strip_prefixes(state, anchors=HF_ANCHORS), _HF_VIT_RENAMES, drop=drop)
    elif layout == "hf-dinov2":
        out = _from_hf(strip_prefixes(state, anchors=HF_ANCHORS), _HF_DINOV2_RENAMES, drop=drop)
        out = _fold_class_position(_resample_positions(out, expected), expected)
    elif layout == "lite0-wheel":
        found = strip_prefixes(state, anchors=LITE0_WHEEL_ANCHORS + LITE0_TIMM_ANCHORS)
        out = found if any(k.startswith(LITE0_TIMM_ANCHORS) for k in found) else _from_lite0_wheel(found)
    elif layout == "resnet":
        out = strip_prefixes(state, anchors=RESNET_ANCHORS)
    elif layout == "conch":
        out = _from_conch(strip_prefixes(state, anchors=CONCH_ANCHORS), expected)
    else:
        out = strip_prefixes(state, anchors=TIMM_VIT_ANCHORS)
    out = {k: v for k, v in out.items() if not k.startswith(drop)}
    if not any(k.startswith("head.") for k in expected):  # a classifier the feature model has no use for
        out = {k: v for k, v in out.items() if not k.startswith("head.")}
    return out


def _from_hf(state: StateDict, renames: tuple[tuple[str, str], ...], *, drop: tuple[str, ...]) -> StateDict:
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if drop and key.startswith(drop):
            continue
        if m := _HF_QKV.match(key):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for pattern, repl in renames:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            out[key] = value  # left as is: the fit check reports it as unexpected
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            missing = sorted({"query", "key", "value"} - set(parts))
            raise ModelConfigError(f"layer {layer} of the weight file lacks attention {kind} for {missing}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def _fold_class_position(state: StateDict, expected: Mapping[str, torch.Tensor]) -> StateDict:
    """DINOv2 gives the class token a position embedding; timm's register models do not
    (``no_embed_class``): add it to the token once, keep only the patches' positions."""
    pos, cls, want = state.get("pos_embed"), state.get("cls_token"), expected.get("pos_embed")
    if pos is None or cls is None or want is None or pos.ndim != 3 or want.ndim != 3:
        return state
    if pos.shape[1] == want.shape[1] + 1 and "reg_token" in expected:
        state = dict(state)
        state["cls_token"] = cls + pos[:, :1].to(cls.dtype)
        state["pos_embed"] = pos[:, 1:]
    return state


def _resample_positions(state: StateDict, expected: Mapping[str, torch.Tensor]) -> StateDict:
    """A DINOv2 file saved for another grid (e.g. ``image_size`` 518): Hugging Face
    interpolates its position embeddings at every forward (bicubic, antialiased, to the
    input's grid); doing the same once on loading gives the same embeddings."""
    pos, want = state.get("pos_embed"), expected.get("pos_embed")
    if pos is None or want is None or pos.ndim != 3 or want.ndim != 3:
        return state
    n_file = pos.shape[1] - 1  # DINOv2 files: one class position, then a square grid
    n_want = want.shape[1] - (0 if "reg_token" in expected else 1)
    g_file, g_want = round(n_file**0.5), round(n_want**0.5)
    if n_file == n_want or g_file**2 != n_file or g_want**2 != n_want:
        return state
    from timm.layers import resample_abs_pos_embed

    state = dict(state)
    state["pos_embed"] = resample_abs_pos_embed(
        pos.float(), new_size=[g_want, g_want], old_size=[g_file, g_file], num_prefix_tokens=1,
        interpolation="bicubic", antialias=True, verbose=False,
    ).to(pos.dtype)
    return state


def _from_conch(state: StateDict, expected: Mapping[str, torch.Tensor]) -> StateDict:
    """CONCH v1.5's vision tower: ``trunk.`` is a timm-named ViT-L/16; its pooler and final
    norm are renamed to ours. The position embeddings are stored for a 14 x 14 grid and, as
    the published model does at every forward, interpolated to the 448 px input's grid:
    bicubic by a scale factor of (grid + 0.1) / 14 (DINO's offset), the class position kept.
    A file saved for another grid is first brought to 14 x 14 as the published loader does
    (bilinear, no antialiasing)."""
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith("attn_pool_contrast."):
            out["pooler." + key[len("attn_pool_contrast."):]] = value
        elif key.startswith("ln_contrast."):
            out["pool_norm." + key[len("ln_contrast."):]] = value
        else:
            out[key] = value
    pos, want = out.get("trunk.pos_embed"), expected.get("trunk.pos_embed")
    if pos is None or want is None or pos.ndim != 3 or pos.shape[1] == want.shape[1]:
        return out
    grid_file, grid_want = round((pos.shape[1] - 1) ** 0.5), round((want.shape[1] - 1) ** 0.5)
    if grid_file**2 != pos.shape[1] - 1 or grid_want**2 != want.shape[1] - 1:
        return out  # not square: the fit check names the shape
    stored = CONCH_STORED_GRID
    if grid_file != stored:
        from timm.layers import resample_abs_pos_embed

        pos = resample_abs_pos_embed(pos.float(), new_size=[stored, stored], num_prefix_tokens=1,
                                     interpolation="bilinear", antialias=False)
    patch = pos[:, 1:].float().reshape(1, stored, stored, -1).permute(0, 3, 1, 2)
    scale = (grid_want + 0.1) / stored
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic")
    if tuple(patch.shape[-2:]) != (grid_want, grid_want):
        return out
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid_want * grid_want, -1)
    out["trunk.pos_embed"] = torch.cat([pos[:, :1].float(), patch], dim=1).to(pos.dtype)
    return out


#: the grid CONCH v1.5's ViT keeps its position embeddings for (224 px / 16)
CONCH_STORED_GRID = 14


def _from_lite0_wheel(state: StateDict) -> StateDict:
    starts, total = [], 0
    for n in LITE0_REPEATS:
        starts.append(total)
        total += n
    out: StateDict = {}
    for key, value in state.items():
        if m := re.match(r"^_blocks\.(\d+)\.(.*)$", key):
            flat, rest = int(m.group(1)), m.group(2)
            stage = max(i for i, s in enumerate(starts) if s <= flat)
            table = _LITE0_DS if flat == 0 else _LITE0_IR
            for old, new in table.items():
                if rest.startswith(old):
                    out[f"blocks.{stage}.{flat - starts[stage]}.{new}{rest[len(old):]}"] = value
                    break
            else:
                out[key] = value
            continue
        for old, new in _LITE0_TOP.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            out[key] = value
    return out
