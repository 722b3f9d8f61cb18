"""A user's weights -> a recipe's network, checked; a file for another recipe is named.

Weights come from local files only: ``.safetensors``, a plain state dict (read with
``weights_only=True``), or a folder as published on a model hub (config.json beside
``model.safetensors`` / ``pytorch_model.bin``). Nothing is downloaded, nothing unpickled.

Every file is checked against the recipe (all keys, all shapes) before a single tensor
is loaded. When it does not fit, the message says what differs and which other recipes
it fits: a Kaiko ViT-B/16 (timm layout, [0.5] normalisation) given as ``phikon`` (Hugging
Face layout, ImageNet normalisation) is refused with "fits kaiko-vitb16", never run with
the wrong pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from napari_dismm.errors import ModelConfigError

from .build import PatchModel, build_model
from .layouts import LAYOUT_NAMES, detect_layout, to_timm
from .recipes import RECIPES, Recipe
from .weights import StateDict, _preview, file_sha256, fit_problems, load_checked, read_state_dict

#: weight files looked for, in this order, inside a published model folder
FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model_vision.bin", "model.pth", "model.pt")


def weights_file(path: str | Path) -> Path:
    """The weight file itself: ``path`` or, for a model folder, the file inside it."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in FOLDER_FILES:
            if (path / name).is_file():
                return path / name
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        if len(found) == 1:
            return path / found[0]
        listed = ", ".join(found) or "none"
        raise ModelConfigError(f"{path} holds no single weight file (looked for {', '.join(FOLDER_FILES)}; found {listed})")
    if not path.is_file():
        raise ModelConfigError(f"encoder weight file not found: {path}")
    return path


def expected_state(recipe: Recipe) -> dict[str, torch.Tensor]:
    """Key -> meta tensor of the recipe's trunk (shapes only; cached per recipe)."""
    key = (recipe.arch, recipe.output, repr(sorted(recipe.kwargs.items())))
    if key not in _EXPECTED:
        _EXPECTED[key] = dict(build_model(recipe, device="meta").loadable.state_dict())
    return _EXPECTED[key]


_EXPECTED: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}


def mapped_for(recipe: Recipe, state: StateDict) -> StateDict:
    """``state`` renamed to the recipe's timm names (see `layouts`)."""
    return to_timm(recipe.layout, state, expected=expected_state(recipe), drop=recipe.drop)


def recipe_problems(recipe: Recipe, state: StateDict, *, layout: str | None = None) -> list[str]:
    """What keeps ``state`` (a published file's tensors) from being ``recipe``'s weights;
    empty when it fits. A file in another layout never fits, even where renaming would
    make its keys match (a timm ViT-B/16 is not Phikon's Hugging Face ViT-B/16)."""
    layout = layout or detect_layout(state)
    if layout != recipe.layout:
        return [
            f"it is a {LAYOUT_NAMES[layout]} file (keys {_preview(state)}), "
            f"the recipe reads {LAYOUT_NAMES[recipe.layout]} files"
        ]
    try:
        return fit_problems(expected_state(recipe), mapped_for(recipe, state))
    except ModelConfigError as error:
        return [str(error)]


def fitting_recipes(state: StateDict, *, among: list[Recipe] | None = None) -> list[str]:
    """Names of the recipes whose layout, every key and every shape ``state`` matches."""
    layout = detect_layout(state)
    candidates = among if among is not None else list(RECIPES.values())
    return [r.name for r in candidates if r.layout == layout and not recipe_problems(r, state, layout=layout)]


def load_recipe_weights(recipe: Recipe, model: PatchModel, path: str | Path) -> str:
    """Load the file at ``path`` into ``model`` (built from ``recipe``); returns the file's hash.

    Raises ModelConfigError naming what does not fit, and the recipes the file fits instead."""
    file = weights_file(path)
    state = read_state_dict(file)
    layout = detect_layout(state)
    problems = recipe_problems(recipe, state, layout=layout)
    if not problems:
        mapped = mapped_for(recipe, state)
        problems = fit_problems(model.loadable.state_dict(), mapped)  # a reduced recipe's own network
    if problems:
        others = [n for n in fitting_recipes(state) if n != recipe.name]
        hint = (
            f"; it fits {', '.join(others)} (use --encoder {others[0]})" if others
            else "; it fits no known recipe"
        )
        raise ModelConfigError(f"{file.name} does not fit recipe {recipe.name!r}: " + "; ".join(problems) + hint)
    load_checked(model.loadable, mapped, source=file.name)
    return hash_once(file)


_HASHES: dict[tuple[str, int, int], str] = {}


def hash_once(file: Path) -> str:
    """sha256 prefix of a weight file, computed once per process per file version."""
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(file)
    return _HASHES[key]
