"""Pairing shown overlay layers with new layer tuples, and the equality that decides what a
refill sets (no viewer needed; the refill in a viewer is tested in test_widget.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from napari.layers import Layer

from napari_dismm.viewer.layers.refill import pair_layers, refill, remember, same
from napari_dismm.viewer.layers.prediction import prediction_layer_data
from tests.viewer.test_prediction_layers import make_prediction, patch_table


@pytest.mark.parametrize(("old", "new", "expected"), [
    (("um", "um"), ("um", "um"), True),
    (("um", "um"), ("pixel", "pixel"), False),
    (0.6, 0.6, True),
    (0.6, 0.5, False),
    ((1.0, 2.0), (1, 2), True),
    (np.array([np.nan, 1.0]), np.array([np.nan, 1.0]), True),
    (np.array([np.nan, 1.0]), np.array([0.0, 1.0]), False),
    (np.zeros((2, 2)), np.zeros((3, 2)), False),
    (True, False, False),
    ("inferno", "viridis", False),
    (pd.DataFrame({"a": [1, 2]}), pd.DataFrame({"a": [1, 2]}), True),
    (pd.DataFrame({"a": [1, 2]}), pd.DataFrame({"a": [1, 3]}), False),
    ({"slide_id": "a"}, {"slide_id": "a"}, False),  # metadata is always given anew
    (object(), object(), False),
])
def test_same(old, new, expected):
    assert same(old, new) is expected


def _prediction(scores, *, mag="20x", size=448, contours=((0, 0), (2000, 0), (2000, 900), (0, 900))):
    rows = [{"x": i * size, "y": 0, "width": size, "height": size, "magnification": mag,
             "tumor_attention": s, "ita_cluster": i % 2, "ita_centre": i == 0} for i, s in enumerate(scores)]
    return make_prediction(patch_table(rows), contours=[list(contours)])


def _layers(prediction, **kwargs):
    return [remember(Layer.create(d, k, kind), k) for d, k, kind in prediction_layer_data(prediction, **kwargs)]


def test_pairs_same_name_then_same_overlay():
    old = _layers(_prediction([0.1, 0.9, 0.5]))
    again = pair_layers(old, prediction_layer_data(_prediction([0.3, 0.2, 0.1])))
    assert all(a is b for a, b in zip(again, old))
    other_mag = pair_layers(old, prediction_layer_data(_prediction([0.3, 0.2], mag="10x", size=896)))
    assert [layer.name if layer else None for layer in other_mag] == [layer.name for layer in old]
    moved = prediction_layer_data(_prediction([0.3, 0.2, 0.1], contours=((0, 0), (900, 0), (900, 900))))
    assert pair_layers(old, moved)[0] is None  # other tissue outlines: a new shapes layer


def test_refill_sets_new_values_and_keeps_user_changes():
    tumor = _layers(_prediction([0.1, 0.9, 0.5]))[1]
    tumor.opacity = 0.95  # the user's, the new tuple gives the same 0.6 as before
    data, kwargs, kind = prediction_layer_data(_prediction([0.2, 0.4], mag="10x", size=896))[1]
    refill(tumor, data, kwargs, kind)
    assert tumor.name == "tumor attention 10x" and tumor.data.shape == data.shape
    np.testing.assert_array_equal(tumor.scale, kwargs["scale"])
    np.testing.assert_array_equal(tumor.translate, kwargs["translate"])
    assert tumor.contrast_limits == pytest.approx(kwargs["contrast_limits"])
    assert tumor.opacity == 0.95 and tumor.metadata["magnification"] == "10x"
