"""Every recipe equals the reference build of its published model, on real H&E crops.

The reference is built independently of the recipe: the timm call written out below as
each model card publishes it (architecture + keyword arguments + output rule), or, for the
models published in Hugging Face layout (Phikon, Phikon-v2, Hibou), a textbook forward
written here from the Hugging Face tensor names (``transformers`` is not a dependency).
Random weights are saved in the published checkpoint's key layout and loaded through
``encoder_from_recipe``; features must agree within 1e-5 of the feature scale.

CI time: the giants (ViT-g/14, ViT-H/14: 0.6-1.1 B parameters) and the ViT-Ls are
compared numerically at a reduced depth (``Recipe.reduced``: same widths, same key
names, fewer blocks); their full-depth key layout and shapes are checked on the meta
device (no memory, no time). CNNs and the ViT-B recipes that need no reduction are in
test_encoders_effnet.py / test_encoders_resnet.py and below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from napari_dismm.errors import ModelConfigError
from napari_dismm.features.encoders import RECIPES, encoder_from_recipe, get_encoder, get_recipe
from napari_dismm.features.encoders.build import build_model
from napari_dismm.features.encoders.loading import expected_state, fitting_recipes, mapped_for
from napari_dismm.features.encoders.weights import fit_problems

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
CROP_ORIGINS = [(1000, 1000), (1400, 1700)]  # tissue in CMU-1-Small-Region (level 0)


@pytest.fixture(scope="module")
def he_crops(cmu_slide_path) -> np.ndarray:
    """Two 224 px H&E crops of the real CMU slide, (2, 224, 224, 3) uint8."""
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(cmu_slide_path)) as slide:
        return np.stack([np.asarray(slide.read_region(xy, 0, (224, 224)).convert("RGB")) for xy in CROP_ORIGINS])


# ---------------------------------------------------------------- published facts (model cards)


@dataclass(frozen=True)
class Card:
    """What a model card publishes: the timm call, the output rule, normalisation, size."""

    arch: str
    kwargs: dict[str, Any]
    output: str  # "cls" or "cls+mean"
    norm: tuple
    dim: int
    input_size: int = 224
    resize: int = 224
    interpolation: str = "bilinear"
    layout: str = "timm"
    extra: dict[str, Any] = field(default_factory=dict)


def _swiglu() -> dict[str, Any]:
    import timm.layers

    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}


CARDS: dict[str, Card] = {
    "uni": Card("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                                              dynamic_img_size=True), "cls", IMAGENET, 1024),
    "uni2-h": Card("vit_giant_patch14_224", dict(img_size=224, patch_size=14, depth=24, num_heads=24,
                                                 init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2,
                                                 num_classes=0, no_embed_class=True, reg_tokens=8,
                                                 dynamic_img_size=True, swiglu=True), "cls", IMAGENET, 1536),
    "virchow": Card("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
                                                 global_pool="", dynamic_img_size=True, swiglu=True),
                    "cls+mean", IMAGENET, 2560, interpolation="bicubic"),
    "virchow2": Card("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4,
                                                  mlp_ratio=5.3375, global_pool="", dynamic_img_size=True,
                                                  swiglu=True), "cls+mean", IMAGENET, 2560, interpolation="bicubic"),
    "h-optimus-0": Card("vit_giant_patch14_reg4_dinov2", dict(img_size=224, global_pool="token", init_values=1e-5,
                                                             num_classes=0, dynamic_img_size=False),
                        "cls", HOPTIMUS, 1536),
    "h-optimus-1": Card("vit_giant_patch14_reg4_dinov2", dict(img_size=224, global_pool="token", init_values=1e-5,
                                                             num_classes=0, dynamic_img_size=False),
                        "cls", HOPTIMUS, 1536),
    "gigapath": Card("vit_giant_patch14_dinov2", dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536,
                                                      depth=40, num_heads=24, init_values=1e-5, mlp_ratio=5.33334,
                                                      num_classes=0), "cls", IMAGENET, 1536, resize=256,
                     interpolation="bicubic"),
    "kaiko-vitb16": Card("vit_base_patch16_224", dict(num_classes=0, dynamic_img_size=True), "cls", HALF, 768),
    "kaiko-vitl14": Card("vit_large_patch14_reg4_dinov2", dict(num_classes=0, dynamic_img_size=True, img_size=518),
                         "cls", HALF, 1024),
    # CONCH v1.5 (TITAN's patch encoder): "trunk." = timm ViT-L/16 built at 224 and run at 448 with its
    # position embeddings interpolated (DINO rule), an attentional pooler (1 query, 8 heads, 768-d), a LayerNorm
    "conch-v1.5": Card("vit_large_patch16_224", dict(init_values=1.0, num_classes=0), "pooler", IMAGENET, 768,
                       input_size=448, resize=448, layout="conch"),
    # Hugging Face layouts: (hidden, layers, heads, patch, registers, swiglu hidden or None, layer scale)
    "phikon": Card("hf-vit", dict(d=768, layers=12, heads=12, patch=16, regs=0, swiglu=None, ls=False), "cls",
                   IMAGENET, 768, layout="hf-vit"),
    "phikon-v2": Card("hf-dinov2", dict(d=1024, layers=24, heads=16, patch=16, regs=0, swiglu=None, ls=True), "cls",
                      IMAGENET, 1024, layout="hf-dinov2"),
    "hibou-b": Card("hf-dinov2", dict(d=768, layers=12, heads=12, patch=14, regs=4, swiglu=2048, ls=True), "cls",
                    HIBOU, 768, interpolation="bicubic", layout="hf-dinov2"),
    "hibou-l": Card("hf-dinov2", dict(d=1024, layers=24, heads=16, patch=14, regs=4, swiglu=2736, ls=True), "cls",
                    HIBOU, 1024, interpolation="bicubic", layout="hf-dinov2"),
}
TRANSFORMERS = sorted(CARDS)
#: blocks kept for the numerical comparison (the full depth is checked on the meta device)
REDUCED_DEPTH = {"uni2-h": 1, "virchow": 1, "virchow2": 1, "h-optimus-0": 1, "h-optimus-1": 1, "gigapath": 1}


def _timm_reference(card: Card, *, depth: int | None, device: str | None = None) -> torch.nn.Module:
    import timm

    kwargs = dict(card.kwargs)
    if kwargs.pop("swiglu", False):
        kwargs.update(_swiglu())
    if depth is not None:
        kwargs["depth"] = depth
    with torch.device(device) if device else torch.device("cpu"):
        return timm.create_model(card.arch, pretrained=False, **kwargs).eval()


def _randomise(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Values large enough that every tensor matters (layer scales ~0.5, not timm's 1e-5)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        shape = value.shape
        if key.endswith(("gamma", "lambda1")):
            t = torch.rand(shape, generator=g) * 0.5 + 0.25
        elif ("norm" in key or "layernorm" in key) and key.endswith("weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2 and not key.endswith(("token", "tokens", "pos_embed", "position_embeddings")):
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        else:
            t = 0.3 * torch.randn(shape, generator=g)
        out[key] = t.contiguous()
    return out


def conch_state(*, depth: int | None, device: str | None = None) -> dict[str, torch.Tensor]:
    """CONCH v1.5's pytorch_model_vision.bin layout: trunk (timm names), pooler, final norm."""
    trunk = _timm_reference(CARDS["conch-v1.5"], depth=depth, device="meta").state_dict()

    def t(*shape):
        return torch.empty(shape, device=device or "cpu")

    s = {"trunk." + k: t(*v.shape) for k, v in trunk.items()}
    p = "attn_pool_contrast."
    s |= {p + "query": t(1, 768), p + "ln_q.weight": t(768), p + "ln_q.bias": t(768), p + "ln_k.weight": t(1024),
          p + "ln_k.bias": t(1024), p + "to_q.weight": t(768, 768), p + "to_kv.weight": t(1536, 1024),
          p + "to_out.weight": t(768, 768), "ln_contrast.weight": t(768), "ln_contrast.bias": t(768)}
    return s


def conch_reference(x: torch.Tensor, s: dict[str, torch.Tensor], *, depth: int) -> torch.Tensor:
    """The published forward: patches + class token, position embeddings interpolated from
    14 x 14 to the input's grid (bicubic, scale factor (grid + 0.1) / 14), timm's blocks,
    then one learned query attending over all tokens, projected, LayerNorm."""
    ref = _timm_reference(CARDS["conch-v1.5"], depth=depth)
    ref.load_state_dict({k[len("trunk."):]: v for k, v in s.items() if k.startswith("trunk.")}, strict=True)
    t = F.conv2d(x, s["trunk.patch_embed.proj.weight"], s["trunk.patch_embed.proj.bias"], stride=16)
    grid = t.shape[-1]
    t = torch.cat([s["trunk.cls_token"].expand(len(x), -1, -1), t.flatten(2).transpose(1, 2)], 1)
    pos = s["trunk.pos_embed"]
    patch = pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((grid + 0.1) / 14, (grid + 0.1) / 14), mode="bicubic")
    t = t + torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1)
    for block in ref.blocks:
        t = block(t)
    t = ref.norm(t)
    p = "attn_pool_contrast."
    k_in = F.layer_norm(t, (1024,), s[p + "ln_k.weight"], s[p + "ln_k.bias"])
    q = F.layer_norm(s[p + "query"], (768,), s[p + "ln_q.weight"], s[p + "ln_q.bias"]) @ s[p + "to_q.weight"].T
    k, v = (k_in @ s[p + "to_kv.weight"].T).chunk(2, dim=-1)
    heads = []
    for j in range(8):
        sl = slice(96 * j, 96 * (j + 1))
        sim = q[:, sl] @ k[..., sl].transpose(1, 2) / math.sqrt(96)
        sim = sim - sim.amax(dim=-1, keepdim=True)
        heads.append(sim.softmax(-1) @ v[..., sl])
    pooled = torch.cat(heads, -1)[:, 0] @ s[p + "to_out.weight"].T
    return F.layer_norm(pooled, (768,), s["ln_contrast.weight"], s["ln_contrast.bias"])


def _apply_rule(tokens: torch.Tensor, rule: str, n_prefix: int) -> torch.Tensor:
    if rule == "cls":
        return tokens[:, 0]
    return torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(1)], dim=-1)


# ---------------------------------------------------------------- Hugging Face layouts


def hf_state(card: Card, *, layers: int, grid: int, device: str | None = None) -> dict[str, torch.Tensor]:
    """A Hugging Face ViTModel / Dinov2 (with registers) state dict, names as published."""
    c = card.kwargs
    d, p = c["d"], c["patch"]

    def t(*shape):
        return torch.empty(shape, device=device or "cpu")

    s = {
        "embeddings.cls_token": t(1, 1, d),
        "embeddings.position_embeddings": t(1, grid * grid + 1, d),
        "embeddings.patch_embeddings.projection.weight": t(d, 3, p, p),
        "embeddings.patch_embeddings.projection.bias": t(d),
        "layernorm.weight": t(d),
        "layernorm.bias": t(d),
    }
    if card.layout == "hf-vit":
        s |= {"pooler.dense.weight": t(d, d), "pooler.dense.bias": t(d)}  # ViTModel's pooler: not used
    else:
        s["embeddings.mask_token"] = t(1, d)
    if c["regs"]:
        s["embeddings.register_tokens"] = t(1, c["regs"], d)
    for i in range(layers):
        q = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            s[q + f"attention.attention.{part}.weight"] = t(d, d)
            s[q + f"attention.attention.{part}.bias"] = t(d)
        s[q + "attention.output.dense.weight"], s[q + "attention.output.dense.bias"] = t(d, d), t(d)
        if card.layout == "hf-vit":
            for n in ("layernorm_before", "layernorm_after"):
                s[q + n + ".weight"], s[q + n + ".bias"] = t(d), t(d)
            s[q + "intermediate.dense.weight"], s[q + "intermediate.dense.bias"] = t(4 * d, d), t(4 * d)
            s[q + "output.dense.weight"], s[q + "output.dense.bias"] = t(d, 4 * d), t(d)
            continue
        for n in ("norm1", "norm2"):
            s[q + n + ".weight"], s[q + n + ".bias"] = t(d), t(d)
        s[q + "layer_scale1.lambda1"], s[q + "layer_scale2.lambda1"] = t(d), t(d)
        if c["swiglu"]:
            h = c["swiglu"]
            s[q + "mlp.weights_in.weight"], s[q + "mlp.weights_in.bias"] = t(2 * h, d), t(2 * h)
            s[q + "mlp.weights_out.weight"], s[q + "mlp.weights_out.bias"] = t(d, h), t(d)
        else:
            s[q + "mlp.fc1.weight"], s[q + "mlp.fc1.bias"] = t(4 * d, d), t(4 * d)
            s[q + "mlp.fc2.weight"], s[q + "mlp.fc2.bias"] = t(d, 4 * d), t(d)
    return s


def hf_reference(x: torch.Tensor, s: dict[str, torch.Tensor], card: Card, *, layers: int) -> torch.Tensor:
    """Textbook forward of the Hugging Face model, head by head, from its own tensor names."""
    c = card.kwargs
    d, h, vit = c["d"], c["heads"], card.layout == "hf-vit"

    def ln(t, name):
        return F.layer_norm(t, (d,), s[name + ".weight"], s[name + ".bias"], eps=1e-6)

    def lin(t, name):
        return t @ s[name + ".weight"].T + s[name + ".bias"]

    t = F.conv2d(x, s["embeddings.patch_embeddings.projection.weight"],
                 s["embeddings.patch_embeddings.projection.bias"], stride=c["patch"]).flatten(2).transpose(1, 2)
    t = torch.cat([s["embeddings.cls_token"].expand(len(x), -1, -1), t], 1) + s["embeddings.position_embeddings"]
    if c["regs"]:  # registers join after the position embeddings, behind the class token
        t = torch.cat([t[:, :1], s["embeddings.register_tokens"].expand(len(x), -1, -1), t[:, 1:]], 1)
    for i in range(layers):
        q = f"encoder.layer.{i}."
        y = ln(t, q + ("layernorm_before" if vit else "norm1"))
        heads = []
        for j in range(h):
            sl = slice(j * d // h, (j + 1) * d // h)
            qq, kk, vv = (y @ s[q + f"attention.attention.{n}.weight"][sl].T + s[q + f"attention.attention.{n}.bias"][sl]
                          for n in ("query", "key", "value"))
            heads.append((qq @ kk.transpose(1, 2) / math.sqrt(d // h)).softmax(-1) @ vv)
        a = lin(torch.cat(heads, -1), q + "attention.output.dense")
        t = t + (a if vit else a * s[q + "layer_scale1.lambda1"])
        y = ln(t, q + ("layernorm_after" if vit else "norm2"))
        if vit:
            m = lin(F.gelu(lin(y, q + "intermediate.dense")), q + "output.dense")
        elif c["swiglu"]:
            x1, x2 = lin(y, q + "mlp.weights_in").chunk(2, dim=-1)
            m = lin(F.silu(x1) * x2, q + "mlp.weights_out")
        else:
            m = lin(F.gelu(lin(y, q + "mlp.fc1")), q + "mlp.fc2")
        t = t + (m if vit else m * s[q + "layer_scale2.lambda1"])
    return ln(t, "layernorm")[:, 0]


# ---------------------------------------------------------------- the recipes state the cards


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_recipe_states_the_published_facts(name):
    recipe, card = get_recipe(name), CARDS[name]
    assert (recipe.mean, recipe.std) == card.norm
    assert (recipe.dim, recipe.input_size, recipe.resize, recipe.interpolation) == (
        card.dim, card.input_size, card.resize, card.interpolation)
    assert recipe.output == card.output and recipe.layout == card.layout


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_full_size_layout_and_dimension_on_the_meta_device(name):
    """All keys and shapes of the published full-size model map onto the recipe's
    network with nothing missing, extra or mis-shaped; the output has ``dim`` features."""
    recipe = get_recipe(name)
    model = build_model(recipe, device="meta")
    with torch.no_grad():
        out = model(torch.empty(2, 3, recipe.input_size, recipe.input_size, device="meta"))
    assert tuple(out.shape) == (2, recipe.dim)
    assert recipe.depth is None or len(model.trunk.blocks) == recipe.depth
    card = CARDS.get(name)
    if card is None:  # the CNNs: their published layouts are tested in their own files
        return
    if card.layout == "timm":
        published = _timm_reference(card, depth=None, device="meta").state_dict()
    elif card.layout == "conch":
        published = conch_state(depth=None, device="meta")
    else:
        grid = 224 // card.kwargs["patch"]
        published = hf_state(card, layers=card.kwargs["layers"], grid=grid, device="meta")
    assert fit_problems(model.loadable.state_dict(), mapped_for(recipe, published)) == []


# ---------------------------------------------------------------- numerical equality


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_features_equal_the_reference_build(tmp_path, he_crops, name):
    card = CARDS[name]
    recipe = get_recipe(name)
    depth = REDUCED_DEPTH.get(name, 2)
    if card.layout == "timm":
        ref = _timm_reference(card, depth=depth)
        state = _randomise(ref.state_dict())
        ref.load_state_dict(state, strict=True)
    elif card.layout == "conch":
        state = _randomise(conch_state(depth=depth))
    else:
        state = _randomise(hf_state(card, layers=depth, grid=224 // card.kwargs["patch"]))
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    enc = encoder_from_recipe(recipe.reduced(depth=depth), weights=path)
    got = enc.encode(he_crops)
    x = enc.preprocess(he_crops)
    with torch.no_grad():
        if card.layout == "timm":
            expected = _apply_rule(ref.forward_features(x), card.output, ref.num_prefix_tokens)
        elif card.layout == "conch":
            expected = conch_reference(x, state, depth=depth)
        else:
            expected = hf_reference(x, state, card, layers=depth)
    assert got.shape == (len(he_crops), card.dim) == expected.shape
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-5 * scale
    assert not torch.allclose(got[0], got[1], atol=1e-3 * scale)  # two crops, two features


def test_reference_is_sharp_a_swapped_query_and_key_changes_the_features(tmp_path, he_crops):
    card = CARDS["hibou-b"]
    state = _randomise(hf_state(card, layers=1, grid=16))
    swapped = dict(state)
    for kind in ("weight", "bias"):
        q, k = (f"encoder.layer.0.attention.attention.{n}.{kind}" for n in ("query", "key"))
        swapped[q], swapped[k] = state[k], state[q]
    save_file(swapped, str(tmp_path / "swapped.safetensors"))
    enc = encoder_from_recipe(get_recipe("hibou-b").reduced(depth=1), weights=tmp_path / "swapped.safetensors")
    with torch.no_grad():
        expected = hf_reference(enc.preprocess(he_crops), state, card, layers=1)
    assert float((enc.encode(he_crops) - expected).abs().max()) > 1e-3 * float(expected.abs().max())


# ---------------------------------------------------------------- preprocessing = the published transforms


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_preprocessing_equals_the_published_torchvision_pipeline(name, he_crops):
    """Resize (shorter side) -> centre crop -> ToTensor -> Normalize, as the cards publish it,
    applied to PIL images of the real crops (also resized from 300 px)."""
    from PIL import Image
    from torchvision import transforms as T

    from napari_dismm.features.encoders.preprocess import Preprocess

    recipe = get_recipe(name)
    mode = T.InterpolationMode.BICUBIC if recipe.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    published = T.Compose([T.Resize(recipe.resize, interpolation=mode), T.CenterCrop(recipe.input_size),
                           T.ToTensor(), T.Normalize(recipe.mean, recipe.std)])
    ours = Preprocess.of(recipe)
    big = np.stack([np.asarray(Image.fromarray(c).resize((300, 300), Image.NEAREST)) for c in he_crops])
    for batch in (he_crops, big):
        expected = torch.stack([published(Image.fromarray(p)) for p in batch])
        got = ours(batch, device=torch.device("cpu"))
        assert got.shape == expected.shape == (len(batch), 3, recipe.input_size, recipe.input_size)
        unit = 1 / 255 / min(recipe.std)  # one grey level, normalised
        if batch.shape[1] == recipe.resize:  # no resampling at all: exact
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        else:  # resampled on uint8 in torch vs in PIL: within rounding
            assert float((got - expected).abs().mean()) < 0.5 * unit
            assert float((got - expected).abs().max()) <= 3.01 * unit


# ---------------------------------------------------------------- the wrong-recipe file (the Kaiko case)


@pytest.fixture(scope="module")
def kaiko_file(tmp_path_factory) -> Path:
    """A full-size Kaiko ViT-B/16 file in timm layout (bf16 zeros: only keys and shapes matter)."""
    ref = _timm_reference(CARDS["kaiko-vitb16"], depth=None, device="meta")
    state = {k: torch.zeros(v.shape, dtype=torch.bfloat16) for k, v in ref.state_dict().items()}
    path = tmp_path_factory.mktemp("kaiko") / "model.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("asked", ["phikon", "vit-base-16", "uni"])
def test_a_kaiko_file_is_refused_for_other_recipes_and_named(kaiko_file, asked):
    with pytest.raises(ModelConfigError) as info:
        get_encoder(asked, weights=kaiko_file)
    message = str(info.value)
    assert "does not fit recipe" in message and "\n" not in message
    assert message.endswith("it fits kaiko-vitb16 (use --encoder kaiko-vitb16)")


def test_a_kaiko_file_runs_as_kaiko_with_its_own_normalisation(kaiko_file):
    enc = get_encoder("kaiko-vitb16", weights=kaiko_file)
    assert (enc.mean, enc.std) == HALF and enc.dim == 768
    assert fitting_recipes({k: v for k, v in expected_state(get_recipe("kaiko-vitb16")).items()}) == ["kaiko-vitb16"]
    assert '"mean":[0.5,0.5,0.5]' in enc.preprocessing


def test_a_published_folder_is_read(tmp_path, kaiko_file):
    folder = tmp_path / "kaiko-folder"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").symlink_to(kaiko_file)
    assert get_encoder("kaiko-vitb16", weights=folder).weights_hash == get_encoder(
        "kaiko-vitb16", weights=kaiko_file).weights_hash
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelConfigError, match="holds no single weight file"):
        get_encoder("kaiko-vitb16", weights=empty)
