"""Weight files as they come: wrapper prefixes, torch or safetensors, half precision, heads
left beside the backbone; and broken or foreign files refused with what does not fit.

Small networks: the ViT-B recipes at depth 2 (same widths and key names as published).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from napari_dismm.errors import ModelConfigError
from napari_dismm.features.encoders import encoder_from_recipe, get_recipe
from tests.features.test_encoders_recipes import CARDS, _randomise, hf_state

KAIKO = get_recipe("kaiko-vitb16").reduced(depth=2)
PHIKON = get_recipe("phikon").reduced(depth=2)


def _timm_state(depth: int = 2, **kwargs) -> dict[str, torch.Tensor]:
    import timm

    with torch.device("meta"):
        ref = timm.create_model("vit_base_patch16_224", num_classes=7, depth=depth, **kwargs)  # a head: dropped
    return _randomise(ref.state_dict())


def _save(state, path):
    save_file(state, str(path)) if path.suffix == ".safetensors" else torch.save(state, path)
    return path


@pytest.mark.parametrize(("prefix", "suffix"), [("", ".safetensors"), ("module.", ".pt"), ("model.", ".bin")])
def test_timm_layout_under_wrappers(tmp_path, prefix, suffix):
    src = _timm_state()
    path = _save({prefix + k: v for k, v in src.items()}, tmp_path / f"kaiko{suffix}")
    trunk = encoder_from_recipe(KAIKO, weights=path).model.trunk.state_dict()
    expected = {k: v for k, v in src.items() if not k.startswith("head.")}
    assert trunk.keys() == expected.keys()
    assert all(torch.equal(trunk[k], v) for k, v in expected.items())


@pytest.mark.parametrize(("prefix", "suffix"), [("", ".safetensors"), ("vit.", ".pt"), ("backbone.", ".safetensors")])
def test_hf_layout_under_wrappers_with_fused_qkv(tmp_path, prefix, suffix):
    src = _randomise(hf_state(CARDS["phikon"], layers=2, grid=14))
    state = {prefix + k: v for k, v in src.items()}
    if prefix == "vit.":  # ViTForImageClassification keeps its head outside the "vit." prefix
        state |= {"classifier.weight": torch.zeros(5, 768), "classifier.bias": torch.zeros(5)}
    trunk = encoder_from_recipe(PHIKON, weights=_save(state, tmp_path / f"phikon{suffix}")).model.trunk
    qkv = trunk.blocks[1].attn.qkv.weight
    assert torch.equal(qkv[:768], src["encoder.layer.1.attention.attention.query.weight"])
    assert torch.equal(qkv[768:1536], src["encoder.layer.1.attention.attention.key.weight"])
    assert torch.equal(qkv[1536:], src["encoder.layer.1.attention.attention.value.weight"])


def test_half_precision_files_are_cast_to_float32(tmp_path):
    src = {k: v.to(torch.bfloat16) for k, v in _timm_state().items()}
    trunk = encoder_from_recipe(KAIKO, weights=_save(src, tmp_path / "bf16.safetensors")).model.trunk
    assert trunk.pos_embed.dtype == torch.float32
    assert torch.equal(trunk.pos_embed, src["pos_embed"].float())


def test_broken_and_foreign_files_are_refused_with_what_differs(tmp_path):
    deeper = _timm_state(depth=3)
    with pytest.raises(ModelConfigError, match=r"unexpected keys \(blocks\.2\."):
        encoder_from_recipe(KAIKO, weights=_save(deeper, tmp_path / "deep.pt"))
    other_size = _timm_state(img_size=64)
    with pytest.raises(ModelConfigError, match=r"pos_embed \(1, 17, 768\) != \(1, 197, 768\)"):
        encoder_from_recipe(KAIKO, weights=_save(other_size, tmp_path / "big.safetensors"))
    hf = _randomise(hf_state(CARDS["phikon"], layers=2, grid=14))
    del hf["encoder.layer.1.attention.attention.value.weight"]
    with pytest.raises(ModelConfigError, match=r"layer 1 .*weight.*\['value'\]"):
        encoder_from_recipe(PHIKON, weights=_save(hf, tmp_path / "broken.safetensors"))
    # a Hugging Face DINOv2 file (Phikon-v2 layout) is not Phikon's ViTModel
    dinov2 = _randomise(hf_state(CARDS["phikon-v2"], layers=2, grid=14))
    with pytest.raises(ModelConfigError, match="it is a Hugging Face DINOv2 file .* reads Hugging Face ViTModel files"):
        encoder_from_recipe(PHIKON, weights=_save(dinov2, tmp_path / "v2.safetensors"))


def test_dinov2_positions_saved_for_another_grid_are_resampled_as_hugging_face_does(tmp_path):
    """Phikon-v2-style file with positions for a 32 x 32 grid (512 px): resampled once on
    loading, bicubic and antialiased, to the 14 x 14 grid of 224 px inputs."""
    from timm.layers import resample_abs_pos_embed

    src = _randomise(hf_state(CARDS["phikon-v2"], layers=1, grid=32))
    trunk = encoder_from_recipe(get_recipe("phikon-v2").reduced(depth=1),
                                weights=_save(src, tmp_path / "v2.safetensors")).model.trunk
    pos = src["embeddings.position_embeddings"]
    expected = resample_abs_pos_embed(pos, new_size=[14, 14], num_prefix_tokens=1, antialias=True)
    assert trunk.pos_embed.shape == (1, 197, 1024)
    torch.testing.assert_close(trunk.pos_embed, expected)
    assert torch.equal(trunk.pos_embed[:, 0], pos[:, 0])  # the class position is kept as is
