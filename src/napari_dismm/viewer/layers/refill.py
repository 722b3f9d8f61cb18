"""Refill a shown overlay layer with a new prediction's data instead of replacing it.

Why: napari spends ~0.1 s inserting a layer whatever its data (vispy visuals, overlays,
event wiring) and a full ``gc.collect()`` removing one; a second Run or a magnification
change brings the same kinds of layer again, so the shown layers take the new data,
placement and style in place and end as a fresh add of the same tuple would. Each setting
napari is given costs events (a new scale re-measures every layer's extent), so only what
differs from the layer's data and from the keywords it was last given is set; a setting
the user changed since, and the new tuple leaves as it was, stays as the user left it.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
import pandas as pd
from napari.layers import Layer

#: keywords only a shapes layer's constructor takes: tissue outlines are reused when equal
SHAPES_CONSTRUCTOR_ONLY = ("shape_type", "face_color", "edge_color", "edge_width")

#: the keywords each layer was created or last refilled with
_GIVEN: WeakKeyDictionary[Layer, dict[str, Any]] = WeakKeyDictionary()


def remember(layer: Layer, kwargs: dict[str, Any]) -> Layer:
    """Record the keywords a layer was made with, so a later refill sets only what differs.

    Metadata is left out: it is always given anew and holds the whole prediction."""
    _GIVEN[layer] = {name: value for name, value in kwargs.items() if name != "metadata"}
    return layer


def layer_kind(layer: Layer) -> str:
    """The layer-data tuple's kind string of a layer ("image", "labels", "points", ...)."""
    return type(layer).__name__.lower()


def refill_key(metadata: dict[str, Any], kind: str) -> tuple:
    """Layers with equal keys are the same overlay of a prediction, whatever its magnification."""
    return kind, metadata.get("dismm_kind"), metadata.get("subspace")


def pair_layers(old: list[Layer], tuples: list[tuple]) -> list[Layer | None]:
    """For each new tuple, a shown layer it can refill (or None).

    Pairs the same name first (a second Run: every layer keeps its place), then the same
    overlay of another magnification, in stacking order."""
    free = list(old)
    pairs: list[Layer | None] = [None] * len(tuples)
    for same_name in (True, False):
        for i, (data, kwargs, kind) in enumerate(tuples):
            if pairs[i] is not None:
                continue
            key = refill_key(kwargs.get("metadata", {}), kind)
            for layer in free:
                if refill_key(layer.metadata, layer_kind(layer)) != key:
                    continue
                if same_name and layer.name != kwargs.get("name"):
                    continue
                if not can_refill(layer, data, kind):
                    continue
                pairs[i] = layer
                free.remove(layer)
                break
    return pairs


def can_refill(layer: Layer, data, kind: str) -> bool:
    if kind != "shapes":
        return True
    # a shapes layer's styles are per shape and set at construction: reuse equal outlines only
    new = [np.asarray(shape) for shape in data]
    return len(new) == len(layer.data) and all(
        a.shape == b.shape and np.array_equal(a, b) for a, b in zip(new, layer.data))


def refill(layer: Layer, data, kwargs: dict[str, Any], kind: str) -> Layer:
    """Give ``layer`` the data and keywords of a layer-data tuple (see the module docstring)."""
    given = _GIVEN.get(layer, {})
    if kind != "shapes" and not same(layer.data, data):
        layer.data = data
    skip = SHAPES_CONSTRUCTOR_ONLY if kind == "shapes" else ()
    # features last, so they meet the new number of points
    for name in sorted(kwargs, key=lambda name: name == "features"):
        if name in skip or (name in given and same(given[name], kwargs[name])):
            continue
        setattr(layer, name, kwargs[name])
    return remember(layer, kwargs)


def same(old, new) -> bool:
    """Whether two layer-tuple values are equal (numbers, strings, arrays with NaN where both
    are NaN, data frames); anything else counts as different, so it is set again."""
    if old is new:
        return True
    if isinstance(old, pd.DataFrame) or isinstance(new, pd.DataFrame):
        return isinstance(old, pd.DataFrame) and isinstance(new, pd.DataFrame) and old.equals(new)
    if isinstance(old, dict) or isinstance(new, dict):
        # colormap dicts (`viewer.colormaps`) are named by everything that makes them
        return (isinstance(old, dict) and isinstance(new, dict) and "colors" in old and "colors" in new
                and old.get("name") == new.get("name"))
    try:
        a, b = np.asarray(old), np.asarray(new)
    except (TypeError, ValueError):
        return False
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "biuf" and b.dtype.kind in "biuf":
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f"))
    return a.dtype.kind in "US" and b.dtype.kind in "US" and bool(np.array_equal(a, b))
