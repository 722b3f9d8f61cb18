"""The ViT loads generated state dicts in timm (UNI) and Hugging Face (Phikon) layouts.

Key names are written out here from each library's layout; the module's forward pass is
checked against a direct computation from the *source* tensors, so a tensor landing in
the wrong place (q and k swapped, a LayerNorm mixed up, gammas ignored) fails.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from napari_dismm.errors import ModelConfigError
from napari_dismm.features.encoders import get_encoder
from napari_dismm.features.encoders.vit import (
    VIT_BASE_16,
    VIT_LARGE_16,
    ViTConfig,
    VisionTransformer,
    build_vit,
    map_hf_keys,
    map_timm_keys,
)

TINY = ViTConfig(dim=32, depth=2, heads=4, image_size=32, patch=16)
TINY_LS = ViTConfig(dim=32, depth=2, heads=4, image_size=32, patch=16, layer_scale=True)


# ---------------------------------------------------------------- generated layouts


def _tensor(shape, g, *, device=None, around=0.0):
    if device == "meta":
        return torch.empty(shape, device="meta")
    return torch.randn(shape, generator=g) * 0.2 + around


def timm_state(cfg: ViTConfig, *, seed: int = 0, device=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, hidden, n = cfg.dim, int(cfg.dim * cfg.mlp_ratio), (cfg.image_size // cfg.patch) ** 2

    def t(*shape, around=0.0):
        return _tensor(shape, g, device=device, around=around)

    s = {
        "cls_token": t(1, 1, d),
        "pos_embed": t(1, n + 1, d),
        "patch_embed.proj.weight": t(d, 3, cfg.patch, cfg.patch),
        "patch_embed.proj.bias": t(d),
        "norm.weight": t(d, around=1.0),
        "norm.bias": t(d),
        "head.weight": t(7, d),  # a classifier: must be dropped
        "head.bias": t(7),
    }
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        s |= {
            p + "norm1.weight": t(d, around=1.0), p + "norm1.bias": t(d),
            p + "attn.qkv.weight": t(3 * d, d), p + "attn.qkv.bias": t(3 * d),
            p + "attn.proj.weight": t(d, d), p + "attn.proj.bias": t(d),
            p + "norm2.weight": t(d, around=1.0), p + "norm2.bias": t(d),
            p + "mlp.fc1.weight": t(hidden, d), p + "mlp.fc1.bias": t(hidden),
            p + "mlp.fc2.weight": t(d, hidden), p + "mlp.fc2.bias": t(d),
        }
        if cfg.layer_scale:
            s |= {p + "ls1.gamma": t(d, around=0.5), p + "ls2.gamma": t(d, around=0.5)}
    return s


def hf_state(cfg: ViTConfig, *, seed: int = 0, device=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, hidden, n = cfg.dim, int(cfg.dim * cfg.mlp_ratio), (cfg.image_size // cfg.patch) ** 2

    def t(*shape, around=0.0):
        return _tensor(shape, g, device=device, around=around)

    s = {
        "embeddings.cls_token": t(1, 1, d),
        "embeddings.position_embeddings": t(1, n + 1, d),
        "embeddings.patch_embeddings.projection.weight": t(d, 3, cfg.patch, cfg.patch),
        "embeddings.patch_embeddings.projection.bias": t(d),
        "layernorm.weight": t(d, around=1.0),
        "layernorm.bias": t(d),
        "pooler.dense.weight": t(d, d),  # ViTModel's pooler: not used for features
        "pooler.dense.bias": t(d),
    }
    for i in range(cfg.depth):
        p = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            s[p + f"attention.attention.{part}.weight"] = t(d, d)
            s[p + f"attention.attention.{part}.bias"] = t(d)
        s |= {
            p + "attention.output.dense.weight": t(d, d), p + "attention.output.dense.bias": t(d),
            p + "layernorm_before.weight": t(d, around=1.0), p + "layernorm_before.bias": t(d),
            p + "layernorm_after.weight": t(d, around=1.0), p + "layernorm_after.bias": t(d),
            p + "intermediate.dense.weight": t(hidden, d), p + "intermediate.dense.bias": t(hidden),
            p + "output.dense.weight": t(d, hidden), p + "output.dense.bias": t(d),
        }
    return s


# ---------------------------------------------------------------- reference forward


def _neutral_from_timm(s, cfg):
    layers = []
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        q_w, k_w, v_w = s[p + "attn.qkv.weight"].chunk(3)
        q_b, k_b, v_b = s[p + "attn.qkv.bias"].chunk(3)
        layers.append(dict(
            ln1=(s[p + "norm1.weight"], s[p + "norm1.bias"]), q=(q_w, q_b), k=(k_w, k_b), v=(v_w, v_b),
            o=(s[p + "attn.proj.weight"], s[p + "attn.proj.bias"]),
            ln2=(s[p + "norm2.weight"], s[p + "norm2.bias"]),
            fc1=(s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"]),
            fc2=(s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"]),
            g1=s.get(p + "ls1.gamma"), g2=s.get(p + "ls2.gamma"),
        ))
    return dict(patch=(s["patch_embed.proj.weight"], s["patch_embed.proj.bias"]), cls=s["cls_token"],
                pos=s["pos_embed"], norm=(s["norm.weight"], s["norm.bias"]), layers=layers)


def _neutral_from_hf(s, cfg):
    layers = []
    for i in range(cfg.depth):
        p = f"encoder.layer.{i}."

        def wb(name, p=p):
            return s[p + name + ".weight"], s[p + name + ".bias"]

        layers.append(dict(
            ln1=wb("layernorm_before"), q=wb("attention.attention.query"), k=wb("attention.attention.key"),
            v=wb("attention.attention.value"), o=wb("attention.output.dense"), ln2=wb("layernorm_after"),
            fc1=wb("intermediate.dense"), fc2=wb("output.dense"), g1=None, g2=None,
        ))
    return dict(
        patch=(
            s["embeddings.patch_embeddings.projection.weight"],
            s["embeddings.patch_embeddings.projection.bias"],
        ),
        cls=s["embeddings.cls_token"], pos=s["embeddings.position_embeddings"],
        norm=(s["layernorm.weight"], s["layernorm.bias"]), layers=layers,
    )


def reference_forward(x: torch.Tensor, p: dict, cfg: ViTConfig) -> torch.Tensor:
    """Textbook pre-norm ViT, head by head, from the neutral parameter dict."""
    d, h = cfg.dim, cfg.heads
    t = F.conv2d(x, *p["patch"], stride=cfg.patch).flatten(2).transpose(1, 2)
    t = torch.cat([p["cls"].expand(x.shape[0], -1, -1), t], dim=1) + p["pos"]
    for L in p["layers"]:
        y = F.layer_norm(t, (d,), *L["ln1"], eps=cfg.eps)
        heads = []
        for j in range(h):
            sl = slice(j * d // h, (j + 1) * d // h)
            q, k, v = (y @ L[n][0][sl].T + L[n][1][sl] for n in ("q", "k", "v"))
            att = (q @ k.transpose(1, 2) / math.sqrt(d // h)).softmax(-1)
            heads.append(att @ v)
        a = torch.cat(heads, dim=-1) @ L["o"][0].T + L["o"][1]
        t = t + (a * L["g1"] if L["g1"] is not None else a)
        y = F.layer_norm(t, (d,), *L["ln2"], eps=cfg.eps)
        m = F.gelu(y @ L["fc1"][0].T + L["fc1"][1]) @ L["fc2"][0].T + L["fc2"][1]
        t = t + (m * L["g2"] if L["g2"] is not None else m)
    return F.layer_norm(t, (d,), *p["norm"], eps=cfg.eps)[:, 0]


def _save(state, path):
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize(("prefix", "suffix"), [("", ".safetensors"), ("module.", ".pt"), ("model.", ".bin")])
def test_timm_layout_with_layer_scale(tmp_path, prefix, suffix):
    src = timm_state(TINY_LS)
    path = _save({prefix + k: v for k, v in src.items()}, tmp_path / f"uni{suffix}")
    model = build_vit(TINY_LS, weights=path)
    ours = model.state_dict()
    expected = {k: v for k, v in src.items() if not k.startswith("head.")}
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[k], v) for k, v in expected.items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(x, _neutral_from_timm(src, TINY_LS), TINY_LS),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("prefix", "suffix"), [("", ".safetensors"), ("vit.", ".pt"), ("backbone.", ".safetensors")]
)
def test_hf_layout_with_separate_qkv(tmp_path, prefix, suffix):
    src = hf_state(TINY)
    state = {prefix + k: v for k, v in src.items()}
    if prefix == "vit.":  # ViTForImageClassification keeps its head outside the "vit." prefix
        state |= {"classifier.weight": torch.zeros(5, TINY.dim), "classifier.bias": torch.zeros(5)}
    model = build_vit(TINY, weights=_save(state, tmp_path / f"phikon{suffix}"))
    qkv = model.blocks[1].attn.qkv.weight
    assert torch.equal(qkv[: TINY.dim], src["encoder.layer.1.attention.attention.query.weight"])
    assert torch.equal(qkv[2 * TINY.dim :], src["encoder.layer.1.attention.attention.value.weight"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(x, _neutral_from_hf(src, TINY), TINY),
                                   rtol=1e-4, atol=1e-4)


def test_reference_catches_a_swapped_query_and_key(tmp_path):
    """The forward check is sharp: swapping q and k in the file changes the output."""
    src = hf_state(TINY)
    swapped = dict(src)
    for kind in ("weight", "bias"):
        q, k = (f"encoder.layer.0.attention.attention.{n}.{kind}" for n in ("query", "key"))
        swapped[q], swapped[k] = src[k], src[q]
    model = build_vit(TINY, weights=_save(swapped, tmp_path / "swapped.safetensors"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model(x), reference_forward(x, _neutral_from_hf(src, TINY), TINY), atol=1e-3)


def test_full_size_layouts_match_uni_and_phikon_shapes():
    """All keys and shapes of ViT-L/16 (UNI, timm) and ViT-B/16 (Phikon, HF), on the meta device."""
    for cfg, state, mapper in [
        (VIT_LARGE_16, timm_state(VIT_LARGE_16, device="meta"), map_timm_keys),
        (VIT_BASE_16, hf_state(VIT_BASE_16, device="meta"), map_hf_keys),
    ]:
        with torch.device("meta"):
            model = VisionTransformer(cfg)
        mapped = mapper(state)
        ours = model.state_dict()
        assert mapped.keys() == ours.keys()
        assert all(mapped[k].shape == ours[k].shape for k in ours)
    assert VIT_LARGE_16.dim == 1024 and VIT_BASE_16.dim == 768
    assert ours["pos_embed"].shape == (1, 197, 768)


def test_half_precision_files_are_cast_to_float32(tmp_path):
    src = {k: v.to(torch.bfloat16) for k, v in timm_state(TINY).items()}
    model = build_vit(TINY, weights=_save(src, tmp_path / "bf16.safetensors"))
    assert model.pos_embed.dtype == torch.float32
    assert torch.equal(model.pos_embed, src["pos_embed"].float())


@pytest.mark.slow
def test_vit_base_16_from_a_generated_phikon_file(tmp_path):
    """End to end through the registry with a full-size (fp16, 170 MB) Phikon-layout file."""
    state = {k: v.half().contiguous() for k, v in hf_state(VIT_BASE_16).items()}
    path = _save(state, tmp_path / "model.safetensors")
    enc = get_encoder("vit-base-16", weights=path)
    feats = enc.encode(torch.randint(0, 256, (1, 256, 256, 3), dtype=torch.uint8))
    assert enc.dim == 768 and feats.shape == (1, 768) and torch.isfinite(feats).all()
    assert len(enc.weights_hash) == 16 and enc.weights_hash != "random-init"


def test_layout_of_the_wrong_architecture_is_refused(tmp_path):
    # HF file (no layer scale) into a layer-scale ViT: the gammas are missing
    with pytest.raises(ModelConfigError, match=r"missing keys \(blocks\.0\.ls1\.gamma"):
        build_vit(TINY_LS, weights=_save(hf_state(TINY), tmp_path / "hf.safetensors"))
    # one block too many
    deeper = timm_state(ViTConfig(dim=32, depth=3, heads=4, image_size=32, patch=16))
    with pytest.raises(ModelConfigError, match=r"unexpected keys \(blocks\.2\."):
        build_vit(TINY, weights=_save(deeper, tmp_path / "deep.pt"))
    # a small ViT's file for ViT-B through the registry: missing blocks and every shape named
    with pytest.raises(ModelConfigError, match=r"missing keys \(blocks\.2\..*shape mismatches \(.*\(32.*!= .*768"):
        get_encoder("vit-base-16", weights=_save(timm_state(TINY), tmp_path / "vit_tiny.safetensors"))


def test_position_embeddings_for_another_resolution_are_named(tmp_path):
    other = timm_state(ViTConfig(dim=32, depth=2, heads=4, image_size=64, patch=16))
    with pytest.raises(ModelConfigError, match=r"pos_embed \(1, 17, 32\) != \(1, 5, 32\)"):
        build_vit(TINY, weights=_save(other, tmp_path / "big.safetensors"))


def test_hf_file_missing_a_value_projection_is_refused(tmp_path):
    src = hf_state(TINY)
    del src["encoder.layer.1.attention.attention.value.weight"]
    with pytest.raises(ModelConfigError, match=r"layer 1 .*weight.*\['value'\]"):
        build_vit(TINY, weights=_save(src, tmp_path / "broken.safetensors"))


def test_vit_rejects_other_input_sizes():
    model = VisionTransformer(TINY).eval()
    with pytest.raises(ValueError, match="32 px"):
        model(torch.zeros(1, 3, 48, 48))
