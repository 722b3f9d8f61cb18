"""ResNet-50 truncated after layer3: the CLAM / DisMM reference patch encoder (1024-d).

Plain torch with torchvision's parameter names (timm's ResNet uses the same ones), so
ImageNet ResNet-50 files from either library, or from wrappers adding ``module.`` /
``backbone.`` prefixes, load after dropping layer4 and the classifier.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .weights import StateDict, load_checked, read_state_dict, strip_prefixes

# (bottleneck width, blocks, stride) for layer1..layer3 of ResNet-50.
LAYERS: tuple[tuple[int, int, int], ...] = ((64, 3, 1), (128, 4, 2), (256, 6, 2))
EXPANSION = 4
ANCHORS = ("conv1.", "bn1.", "layer1.")
DROPPED = ("layer4.", "fc.")


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride, as in torchvision "v1.5") -> 1x1 expand, + skip."""

    def __init__(self, *, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * EXPANSION
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(h + skip)


class ResNet50Trunc(nn.Module):
    """Stem + layer1..layer3, then global average pooling: (B, 3, H, W) -> (B, 1024)."""

    dim = 1024

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        c_in = 64
        for i, (width, blocks, stride) in enumerate(LAYERS, start=1):
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(c_in=c_in, width=width, stride=stride if b == 0 else 1))
                c_in = width * EXPANSION
            self.add_module(f"layer{i}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), kernel_size=3, stride=2, padding=1)
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(-2, -1))


def map_resnet_keys(state: StateDict) -> StateDict:
    """torchvision / timm / CLAM layouts (any wrapper prefix) -> our names; layer4 and fc dropped."""
    state = strip_prefixes(state, anchors=ANCHORS)
    return {k: v for k, v in state.items() if not k.startswith(DROPPED)}


def build_resnet50_trunc(*, weights: str | Path | None) -> ResNet50Trunc:
    """The truncated ResNet-50, loaded from `weights` when given (random init otherwise)."""
    model = ResNet50Trunc()
    if weights is not None:
        path = Path(weights)
        load_checked(model, map_resnet_keys(read_state_dict(path)), source=path.name)
    return model.eval()
