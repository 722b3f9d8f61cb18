"""Encoder registry, the Encoder's preprocessing contract, and safe weight-file reading."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from napari_dismm.errors import DismmError, ModelConfigError
from napari_dismm.features import encoders
from napari_dismm.features.encoders import (
    DEFAULT_ENCODER,
    UnknownEncoderError,
    get_encoder,
    list_encoders,
)
from napari_dismm.features.encoders.base import precision_for, resolve_device
from napari_dismm.features.encoders import RECIPES, shipped_weights_path
from napari_dismm.features.encoders.weights import read_state_dict, strip_prefixes


@pytest.fixture(scope="module")
def lite0():
    return get_encoder("efficientnet-lite0")


@pytest.fixture(scope="module")
def resnet_random():
    return get_encoder("resnet50-trunc", allow_random=True)


def _patches(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------- registry


def test_list_encoders_default_first():
    names = list_encoders()
    assert names[0] == DEFAULT_ENCODER == "efficientnet-lite0"
    assert set(names) == set(RECIPES) >= {
        "efficientnet-lite0", "resnet50-trunc", "uni", "uni2-h", "virchow", "virchow2", "h-optimus-0",
        "h-optimus-1", "gigapath", "phikon", "phikon-v2", "hibou-b", "hibou-l", "kaiko-vitb16",
    }


def test_old_names_build_their_recipes():
    """Feature files and models of before the recipes name vit-large-16 (UNI) / vit-base-16 (Phikon)."""
    assert get_encoder("vit-base-16", allow_random=True).name == "phikon"
    assert encoders.get_recipe("vit-large-16") is RECIPES["uni"]


def test_unknown_name_is_refused_with_the_known_names():
    with pytest.raises(UnknownEncoderError) as info:
        get_encoder("resnet51")
    assert isinstance(info.value, ValueError) and isinstance(info.value, DismmError)
    message = str(info.value)
    assert "'resnet51'" in message and "\n" not in message
    for name in list_encoders():
        assert name in message


@pytest.mark.parametrize("name", sorted(set(RECIPES) - {DEFAULT_ENCODER}))
def test_user_weight_encoders_refuse_random_weights_by_default(name):
    with pytest.raises(ModelConfigError, match="allow_random=True"):
        get_encoder(name)


def test_missing_weight_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelConfigError, match="not found"):
        get_encoder("resnet50-trunc", weights=tmp_path / "nope.safetensors")


def test_output_dims_of_the_cheap_encoders(lite0, resnet_random):
    vit_b = get_encoder("phikon", allow_random=True)
    for enc, dim in [(lite0, 1280), (resnet_random, 1024), (vit_b, 768)]:
        feats = enc.encode(_patches(2, 224))
        assert enc.dim == dim and feats.shape == (2, dim)
        assert feats.dtype == torch.float32 and torch.isfinite(feats).all()
        assert enc.input_size == 224


@pytest.mark.slow
def test_vit_large_output_dim():
    enc = get_encoder("uni", allow_random=True)
    assert enc.dim == 1024
    assert enc.encode(_patches(1, 224)).shape == (1, 1024)


def test_random_weights_are_reproducible_and_marked(resnet_random):
    again = get_encoder("resnet50-trunc", allow_random=True)
    batch = _patches(2, 224, seed=3)
    assert resnet_random.weights_hash == again.weights_hash == "random-init"
    assert torch.equal(resnet_random.encode(batch), again.encode(batch))


def test_weights_hash_is_the_sha256_of_the_shipped_file(lite0):
    path = shipped_weights_path()
    full = hashlib.sha256(path.read_bytes()).hexdigest()
    assert lite0.weights_hash == full[: len(lite0.weights_hash)] and len(lite0.weights_hash) >= 12
    # torch-hub file names carry the first 8 hex digits of the sha256: an independent check
    assert path.stem.endswith(full[:8])


# ---------------------------------------------------------------- preprocess / encode


def test_preprocess_at_224_is_exact_normalisation_without_resampling(lite0):
    batch = _patches(2, 224)
    x = lite0.preprocess(batch)
    mean = torch.tensor(lite0.mean).view(1, 3, 1, 1)
    std = torch.tensor(lite0.std).view(1, 3, 1, 1)
    expected = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)


def test_preprocess_resizes_other_sizes_in_torch(lite0):
    flat = np.full((3, 512, 512, 3), 200, dtype=np.uint8)  # a constant image stays constant
    x = lite0.preprocess(torch.from_numpy(flat))
    assert x.shape == (3, 3, 224, 224)
    torch.testing.assert_close(x, torch.full_like(x, (200 / 255 - 0.5) / 0.5))
    small = lite0.preprocess(_patches(1, 112))
    assert small.shape == (1, 3, 224, 224)


def test_preprocess_rejects_wrong_dtype_and_layout(lite0):
    with pytest.raises(TypeError, match="uint8"):
        lite0.preprocess(np.zeros((1, 224, 224, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        lite0.preprocess(np.zeros((1, 3, 224, 224), dtype=np.uint8))
    with pytest.raises(ValueError):
        lite0.preprocess(np.zeros((224, 224, 3), dtype=np.uint8))


def test_encode_is_model_of_preprocess_without_grad(lite0):
    batch = _patches(3, 224, seed=1)
    feats = lite0.encode(batch)
    with torch.no_grad():
        direct = lite0.model(lite0.preprocess(batch))
    torch.testing.assert_close(feats, direct)
    assert not feats.requires_grad and feats.device.type == "cpu"
    # each patch is encoded independently of its batch neighbours (eval-mode BatchNorm)
    torch.testing.assert_close(lite0.encode(batch[1:2]), feats[1:2], rtol=1e-4, atol=1e-5)


def test_empty_batch_gives_empty_features(lite0):
    out = lite0.encode(np.zeros((0, 224, 224, 3), dtype=np.uint8))
    assert out.shape == (0, 1280) and out.dtype == torch.float32


def test_model_is_in_eval_mode_and_frozen(lite0):
    assert not lite0.model.training
    assert not any(p.requires_grad for p in lite0.model.parameters())


def test_device_and_precision_choice(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert precision_for(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")  # CUDA only when asked for with "auto"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision_for(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision_for(torch.device("cuda")) == torch.float16


# ---------------------------------------------------------------- weight files


class _Sneaky:
    """Unpickling this would create a file: proof that nothing is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_a_custom_object_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "payload": _Sneaky(marker)}, path)
    with pytest.raises(ModelConfigError, match="refusing to load evil.pt") as info:
        get_encoder("resnet50-trunc", weights=path)
    assert "unpickling" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_corrupt_files_are_refused(tmp_path):
    for name in ["bad.pt", "bad.safetensors", "bad.bin"]:
        (tmp_path / name).write_bytes(b"not a weight file" * 10)
        with pytest.raises(ModelConfigError, match=name):
            read_state_dict(tmp_path / name)


def test_non_state_dicts_are_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ModelConfigError, match="not a state dict"):
        read_state_dict(tmp_path / "list.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(ModelConfigError, match="no tensors"):
        read_state_dict(tmp_path / "meta.pt")


def test_nested_checkpoints_and_safetensors_read_the_same(tmp_path):
    state = {"a.weight": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    torch.save({"epoch": 4, "state_dict": state}, tmp_path / "ckpt.pt")
    save_file(state, str(tmp_path / "w.safetensors"))
    for path in [tmp_path / "ckpt.pt", tmp_path / "w.safetensors"]:
        got = read_state_dict(path)
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], state[k]) for k in state)


def test_strip_prefixes_keeps_the_backbone_and_leaves_wrapper_heads():
    t = torch.zeros(1)
    state = {"module.backbone.conv1.weight": t, "module.backbone.layer1.x": t, "module.head.fc": t}
    assert set(strip_prefixes(state, anchors=("conv1.",))) == {"conv1.weight", "layer1.x"}
    # an unknown but shared first component is peeled too
    assert set(strip_prefixes({"net.conv1.w": t}, anchors=("conv1.",))) == {"conv1.w"}
    # keys already at the anchor are untouched, even if a later key starts with a known prefix
    hf = {"embeddings.cls_token": t, "encoder.layer.0.x": t}
    assert strip_prefixes(hf, anchors=("embeddings.",)) == hf


def test_package_exports():
    assert set(encoders.__all__) >= {"get_encoder", "list_encoders", "Encoder", "UnknownEncoderError"}


def test_each_recipe_has_its_gpu_precision(monkeypatch):
    """Autocast dtype on CUDA comes from the recipe (TRIDENT's published choices); bf16 falls
    back to fp16 on GPUs without it; the CPU always runs fp32."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    wanted = {name: precision_for(cuda, RECIPES[name].precision) for name in RECIPES}
    assert wanted["uni2-h"] == torch.bfloat16 and wanted["uni"] == torch.float16
    assert wanted["virchow2"] == torch.float16 and wanted["phikon"] == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision_for(cuda, RECIPES["uni2-h"].precision) == torch.float16
    assert all(precision_for(torch.device("cpu"), r.precision) == torch.float32 for r in RECIPES.values())


def test_batches_are_sized_for_the_device():
    """On a GPU the batch follows the free memory and the recipe's cost per patch; an
    explicit size always wins; the CPU keeps its fixed batch."""
    import torch

    from napari_dismm.features.encoders.base import CPU_BATCH, Encoder, fit_batch

    assert fit_batch(10e6, 16e9) == 960 and fit_batch(200e6, 16e9) == 48
    assert fit_batch(1e9, 4e9) == 8 and fit_batch(1e3, 80e9) == 1024
    enc = Encoder(name="x", model=torch.nn.Identity(), dim=3, weights_hash="h")
    assert enc.batch_size(None) == CPU_BATCH and enc.batch_size(5) == 5
