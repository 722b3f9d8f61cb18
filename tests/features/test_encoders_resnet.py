"""resnet50-trunc (timm's ResNet-50, features after layer3) loads generated ResNet-50 state
dicts in the usual layouts, equals torchvision's ResNet-50 cut after layer3, refuses others.

The key names are written out here from the torchvision layout (timm's ResNet uses the
same names), not taken from our module, so a naming slip in the module fails the test.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from napari_dismm.errors import ModelConfigError
from napari_dismm.features.encoders import get_encoder
from tests.features.test_encoders_recipes import he_crops  # noqa: F401  (fixture)


def torchvision_resnet50_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of torchvision's resnet50 (incl. layer4 and fc), random values."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, c_out: int, c_in: int, k: int) -> None:
        state[f"{name}.weight"] = torch.randn(c_out, c_in, k, k, generator=g) * (2 / (c_in * k * k)) ** 0.5

    def bn(name: str, c: int) -> None:
        state[f"{name}.weight"] = torch.rand(c, generator=g) + 0.5
        state[f"{name}.bias"] = torch.randn(c, generator=g) * 0.1
        state[f"{name}.running_mean"] = torch.randn(c, generator=g) * 0.1
        state[f"{name}.running_var"] = torch.rand(c, generator=g) + 0.5
        state[f"{name}.num_batches_tracked"] = torch.tensor(123)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    c_in = 64
    for i, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            p = f"layer{i}.{b}"
            conv(f"{p}.conv1", width, c_in, 1)
            bn(f"{p}.bn1", width)
            conv(f"{p}.conv2", width, width, 3)
            bn(f"{p}.bn2", width)
            conv(f"{p}.conv3", width * 4, width, 1)
            bn(f"{p}.bn3", width * 4)
            if b == 0:
                conv(f"{p}.downsample.0", width * 4, c_in, 1)
                bn(f"{p}.downsample.1", width * 4)
            c_in = width * 4
    state["fc.weight"] = torch.randn(1000, 2048, generator=g) * 0.01
    state["fc.bias"] = torch.zeros(1000)
    return state


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    return torchvision_resnet50_state()


def _kept(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in source.items()
        if not k.startswith(("layer4.", "fc.")) and not k.endswith("num_batches_tracked")
    }


def _assert_landed(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(ours[key].cpu(), value), key


CASES = [
    ("safetensors", "", False),  # plain torchvision / timm export
    ("safetensors", "backbone.", True),  # SSL framework, counters dropped
    ("pt", "model.encoder.", False),  # Lightning wrapping an encoder
]


@pytest.mark.parametrize(("fmt", "prefix", "drop_counters"), CASES)
def test_generated_layouts_load_into_resnet50_trunc(tmp_path, source, fmt, prefix, drop_counters):
    state = {
        f"{prefix}{k}": v
        for k, v in source.items()
        if not (drop_counters and k.endswith("num_batches_tracked"))
    }
    if prefix:  # a wrapper's own head beside the backbone, one level up: left behind
        parent = prefix[:-1].rpartition(".")[0]
        state[f"{parent}.head.weight" if parent else "head.weight"] = torch.zeros(3, 3)
    path = tmp_path / f"resnet50.{fmt}"
    save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
    enc = get_encoder("resnet50-trunc", weights=path)
    _assert_landed(enc.model.trunk, _kept(source))
    if not prefix:
        feats = enc.encode(torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8))
        assert feats.shape == (2, 1024) and torch.isfinite(feats).all()


def test_nested_checkpoint_loads(tmp_path, source):
    # DataParallel prefix inside a training checkpoint
    torch.save({"epoch": 10, "state_dict": {f"module.{k}": v for k, v in source.items()}}, tmp_path / "c.pth")
    enc = get_encoder("resnet50-trunc", weights=tmp_path / "c.pth")
    _assert_landed(enc.model.trunk, _kept(source))


def test_features_equal_torchvision_resnet50_cut_after_layer3(tmp_path, source, he_crops):
    """The reference build: torchvision's resnet50 with the whole file (layer4 and fc too),
    run to layer3 and averaged, on real H&E crops normalised with ImageNet statistics."""
    import torchvision

    save_file(source, str(tmp_path / "r50.safetensors"))
    enc = get_encoder("resnet50-trunc", weights=tmp_path / "r50.safetensors")
    ref = torchvision.models.resnet50().eval()
    ref.load_state_dict(source, strict=True)
    x = enc.preprocess(he_crops)
    with torch.no_grad():
        h = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        expected = ref.layer3(ref.layer2(ref.layer1(h))).mean(dim=(-2, -1))
    got = enc.encode(he_crops)
    assert got.shape == (len(he_crops), 1024)
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def test_wrong_shapes_are_named(tmp_path, source):
    state = dict(source)
    state["layer2.0.conv2.weight"] = torch.zeros(256, 256, 3, 3)  # a wide-ResNet block
    save_file(state, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ModelConfigError) as info:
        get_encoder("resnet50-trunc", weights=tmp_path / "wide.safetensors")
    message = str(info.value)
    assert "wide.safetensors does not fit" in message
    assert "layer2.0.conv2.weight (256, 256, 3, 3) != (128, 128, 3, 3)" in message


def test_resnet18_is_refused_with_missing_keys(tmp_path):
    """A basic-block ResNet (no conv3, 3x3 convs only) is the wrong architecture."""
    state = {"conv1.weight": torch.zeros(64, 3, 7, 7)}
    for i, w in enumerate([64, 128, 256], start=1):
        for b in range(2):
            state[f"layer{i}.{b}.conv1.weight"] = torch.zeros(w, w, 3, 3)
            state[f"layer{i}.{b}.conv2.weight"] = torch.zeros(w, w, 3, 3)
    torch.save(state, tmp_path / "r18.pt")
    with pytest.raises(ModelConfigError) as info:
        get_encoder("resnet50-trunc", weights=tmp_path / "r18.pt")
    message = str(info.value)
    assert "missing keys (bn1.weight" in message and "\n" not in message
    assert "layer1.0.conv1.weight (64, 64, 3, 3) != (64, 64, 1, 1)" in message


def test_a_vit_file_is_refused(tmp_path):
    state = {"patch_embed.proj.weight": torch.zeros(8, 3, 16, 16), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}
    save_file(state, str(tmp_path / "vit.safetensors"))
    with pytest.raises(ModelConfigError, match=r"it is a timm ViT file \(keys .*patch_embed\.proj\.weight.*the recipe reads ResNet files"):
        get_encoder("resnet50-trunc", weights=tmp_path / "vit.safetensors")
