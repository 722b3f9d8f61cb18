"""resnet50-trunc loads generated ResNet-50 state dicts in the usual layouts and refuses others.

The key names are written out here from the torchvision layout (timm's ResNet uses the
same names), not taken from our module, so a naming slip in the module fails the test.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from napari_dismm.errors import ModelConfigError
from napari_dismm.features.encoders import get_encoder
from napari_dismm.features.encoders.resnet import ResNet50Trunc


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
    _assert_landed(enc.model, _kept(source))
    if not prefix:
        feats = enc.encode(torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8))
        assert feats.shape == (2, 1024) and torch.isfinite(feats).all()


def test_nested_checkpoint_loads(tmp_path, source):
    # DataParallel prefix inside a training checkpoint
    torch.save({"epoch": 10, "state_dict": {f"module.{k}": v for k, v in source.items()}}, tmp_path / "c.pth")
    enc = get_encoder("resnet50-trunc", weights=tmp_path / "c.pth")
    _assert_landed(enc.model, _kept(source))


def test_forward_matches_a_direct_computation(source):
    """Stem + first bottleneck written out with functional ops, compared to the module."""
    model = ResNet50Trunc().eval()
    model.load_state_dict({k: v for k, v in source.items() if k in model.state_dict()})
    s = source
    x = torch.randn(1, 3, 64, 64)

    def bn(t, name):
        return torch.nn.functional.batch_norm(
            t, s[f"{name}.running_mean"], s[f"{name}.running_var"], s[f"{name}.weight"], s[f"{name}.bias"]
        )

    F = torch.nn.functional
    h = F.max_pool2d(F.relu(bn(F.conv2d(x, s["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    b = F.relu(bn(F.conv2d(h, s["layer1.0.conv1.weight"]), "layer1.0.bn1"))
    b = F.relu(bn(F.conv2d(b, s["layer1.0.conv2.weight"], padding=1), "layer1.0.bn2"))
    b = bn(F.conv2d(b, s["layer1.0.conv3.weight"]), "layer1.0.bn3")
    expected = F.relu(b + bn(F.conv2d(h, s["layer1.0.downsample.0.weight"]), "layer1.0.downsample.1"))
    with torch.no_grad():
        stem = F.max_pool2d(F.relu(model.bn1(model.conv1(x))), 3, 2, 1)
        got = model.layer1[0](stem)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


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
    with pytest.raises(ModelConfigError, match="unexpected keys.*patch_embed"):
        get_encoder("resnet50-trunc", weights=tmp_path / "vit.safetensors")
