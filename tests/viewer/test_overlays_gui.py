"""Readable overlays in a real viewer (Xvfb): the minimum of an attention map is drawn fully
transparent, so the tissue shows through, and the only slide is chosen in the widget."""

from __future__ import annotations

import numpy as np
import pytest

from tests.viewer.test_prediction_layers import make_prediction, patch_table

pytestmark = pytest.mark.gui


def _flat_prediction(value: float):
    """A 3 x 3 block of patches all at the same attention: min-max normalises it to 0."""
    rows = [{"x": 400 + 448 * (i % 3), "y": 300 + 448 * (i // 3), "width": 448, "height": 448,
             "tumor_attention": value, "tme_attention": value} for i in range(9)]
    return make_prediction(patch_table(rows))


def test_colormap_alpha_is_zero_at_the_minimum(make_napari_viewer):
    from napari_dismm.viewer.layers.prediction import prediction_layer_data
    from napari_dismm.viewer.layers.display import add_layer_tuples

    viewer = make_napari_viewer(show=True)
    rng = np.random.default_rng(0)
    tissue = rng.integers(60, 200, size=(1800, 2400, 3), dtype=np.uint8)  # textured, not flat
    viewer.add_image(tissue, rgb=True, name="slide", scale=(0.5, 0.5), units=("um", "um"))
    pred = _flat_prediction(0.3)
    layers = add_layer_tuples(viewer, prediction_layer_data(pred, normalisation="minmax"), prediction=pred)
    tumor = next(layer for layer in layers if layer.name == "tumor attention 20x")
    for layer in layers:
        layer.visible = layer is tumor
    tumor.opacity = 1.0
    tumor.colorbar.visible = False  # the colour bar would differ in its corner
    assert np.all(tumor.data[np.isfinite(tumor.data)] == 0.0)
    lo, hi = tumor.contrast_limits
    assert tumor.colormap.map(np.array([0.0]))[0, 3] == 0.0  # the minimum of the range
    assert tumor.colormap.map(np.array([1.0]))[0, 3] == 1.0
    viewer.reset_view()

    def shown_minus_hidden() -> float:
        tumor.visible = True
        shown = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float)
        tumor.visible = False
        hidden = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float)
        assert hidden.std() > 10  # the slide is drawn
        return float(np.abs(shown - hidden).max())

    assert shown_minus_hidden() <= 1.0  # at the minimum the overlay draws nothing
    # the same map with an opaque colormap covers the tissue: the check can fail
    from napari_dismm.viewer.layers.display import restyle_attention

    restyle_attention([tumor], normalisation="minmax", smoothing=0.0, transparent_low=False)
    assert tumor.colormap.map(np.array([0.0]))[0, 3] == 1.0
    assert shown_minus_hidden() > 50


def test_the_only_slide_is_preselected(make_napari_viewer, tmp_path):
    from napari_dismm.slide import write_sample_slide
    from napari_dismm.viewer.widget import PredictionWidget

    first = write_sample_slide(tmp_path / "a.tif", width=1200, height=900, mpp=0.5, seed=1).path
    second = write_sample_slide(tmp_path / "b.tif", width=1200, height=900, mpp=0.5, seed=2).path
    viewer = make_napari_viewer(show=True)
    widget = PredictionWidget(viewer)  # docked before any slide is open
    viewer.window.add_dock_widget(widget, name="DisMM")
    assert widget.slide.value is None
    viewer.add_image(np.zeros((8, 8), np.float32), name="not a slide")
    assert widget.slide.value is None
    viewer.open(str(first), plugin="napari-dismm")
    assert widget.slide.value is viewer.layers["a.tif"]
    viewer.open(str(second), plugin="napari-dismm")
    assert widget.slide.value is viewer.layers["a.tif"]  # a second slide does not steal the choice
    viewer.layers.remove("a.tif")
    assert widget.slide.value is viewer.layers["b.tif"]  # the only one left
    # a widget opened over a viewer that already shows one slide has it chosen
    assert PredictionWidget(viewer).slide.value is viewer.layers["b.tif"]


def test_view_docks_the_widget_after_the_first_frame(make_napari_viewer, qtbot):
    """`dismm view` draws the slide first and docks the prediction widget right after."""
    from napari_dismm.viewer.app import after_first_frame, dock_prediction_widget

    viewer = make_napari_viewer(show=True)
    viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True)
    docked = []
    after_first_frame(viewer, lambda: docked.append(dock_prediction_widget(viewer)))
    assert not docked
    qtbot.waitUntil(lambda: bool(docked), timeout=10_000)
    assert "DisMM prediction" in viewer.window.dock_widgets
