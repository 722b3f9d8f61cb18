"""Readable overlays without a viewer: the fading colormaps and how layer tuples carry them."""

from __future__ import annotations

import numpy as np
import pytest

from napari_dismm.errors import DismmError
from napari_dismm.viewer.colormaps import ALPHA_FULL_AT, PERCEPTUAL, alpha_ramp, overlay_colormap
from napari_dismm.viewer.layers.prediction import prediction_layer_data
from tests.viewer.test_prediction_layers import make_prediction, patch_table


@pytest.mark.parametrize("name", PERCEPTUAL)
def test_alpha_ramps_from_zero_and_colours_are_matplotlibs(name):
    from matplotlib import colormaps

    cmap = overlay_colormap(name)
    colours, controls = cmap["colors"], cmap["controls"]
    assert colours[0, 3] == 0.0 and colours[-1, 3] == 1.0
    assert np.all(np.diff(colours[:, 3]) >= 0)  # never less opaque as the value grows
    np.testing.assert_allclose(colours[:, 3], alpha_ramp(controls), atol=1e-6)
    np.testing.assert_allclose(colours[:, :3], colormaps[name](controls)[:, :3], atol=1e-6)
    assert alpha_ramp(np.array([ALPHA_FULL_AT / 2]))[0] == pytest.approx(0.5)
    opaque = overlay_colormap(name, transparent_low=False)
    assert np.all(opaque["colors"][:, 3] == 1.0) and opaque["name"] != cmap["name"]


def test_unknown_colormap_is_refused():
    with pytest.raises(DismmError, match="unknown colormap 'jet'"):
        overlay_colormap("jet")


def test_layer_tuples_take_the_chosen_colormaps():
    pred = make_prediction(patch_table([
        {"x": 0, "y": 0, "width": 448, "height": 448, "tumor_attention": 1.0, "tme_attention": 0.2},
        {"x": 448, "y": 0, "width": 448, "height": 448, "tumor_attention": 0.5, "tme_attention": 0.7},
    ]))
    by_name = {kw["name"]: kw for _, kw, _ in prediction_layer_data(pred)}
    assert by_name["tumor attention 20x"]["colormap"]["name"] == "dismm inferno fading 0.5"
    assert by_name["TME attention 20x"]["colormap"]["name"] == "dismm viridis fading 0.5"
    chosen = prediction_layer_data(pred, colormaps={"tumor": "magma", "TME": "cividis"}, transparent_low=False)
    by_name = {kw["name"]: kw for _, kw, _ in chosen}
    assert by_name["tumor attention 20x"]["colormap"]["name"] == "dismm magma"
    assert by_name["TME attention 20x"]["metadata"]["colormap_name"] == "cividis"
    assert by_name["TME attention 20x"]["colormap"]["colors"][0, 3] == 1.0
