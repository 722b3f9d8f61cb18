"""Prediction layers in a viewer: add them in one go and in display order, restyle the
attention overlays, and read a shapes layer as a region in slide pixels.

Why apart from the widget: `dismm view BUNDLE`, the widget and the benchmarks add the same
layers the same way; none of this needs the widget's state.
"""

from __future__ import annotations

import contextlib

import numpy as np
from napari.layers import Image, Layer, Shapes

from napari_dismm.viewer.colormaps import overlay_colormap
from napari_dismm.viewer.layers.refill import pair_layers, refill, remember
from napari_dismm.viewer.layers.prediction import display_grid, prediction_layer_data

#: the metadata kinds of a prediction's overlay layers
PREDICTION_KINDS = ("attention", "ita", "ita_centres", "tissue", "patches")


def prediction_layers_in(viewer, slide_id: str | None = None) -> list[Layer]:
    """The overlay layers of one slide's prediction (of any slide when ``slide_id`` is None)."""
    return [
        layer for layer in viewer.layers
        if layer.metadata.get("dismm_kind") in PREDICTION_KINDS
        and (slide_id is None or layer.metadata.get("slide_id") == slide_id)
    ]


def add_layer_tuples(viewer, tuples, *, prediction=None) -> list[Layer]:
    """Show prepared layer tuples in place of the same slide's previous prediction layers.

    A shown overlay of the same kind is refilled (`layers.refill`: a second Run or a
    magnification change costs no napari layer insert or removal); the rest are added,
    leftovers removed, and the slide's overlays end stacked in the tuples' order. Ends as
    napari's own adds do (the last layer alone selected: the patch points, whose hover
    shows the scores), but selects it once instead of once per layer: each selection
    change rebuilds the layer-controls dock and repaints the canvas."""
    slide_ids = {kw["metadata"].get("slide_id") for _, kw, _ in tuples}
    old = [lay for sid in slide_ids for lay in prediction_layers_in(viewer, sid)]
    pairs = pair_layers(old, tuples)
    unused = [lay for lay in old if not any(lay is paired for paired in pairs)]
    if unused:
        # napari runs a full gc.collect() and a scene-graph rebuild after each removed
        # layer (~0.5 s each with a big heap); inside a batch it does both once
        with viewer.layers.batched_update():
            for layer in unused:
                viewer.layers.remove(layer)
    shown = []
    with _activate_once(viewer.layers), _scene_graph_once(viewer):
        for (data, kwargs, kind), layer in zip(tuples, pairs):
            if prediction is not None:
                kwargs["metadata"]["dismm_prediction"] = prediction
            new = layer is None
            layer = remember(Layer.create(data, kwargs, kind), kwargs) if new else refill(layer, data, kwargs, kind)
            if isinstance(layer, Image) and layer.metadata.get("dismm_kind") == "attention":
                layer.colorbar.visible = layer.colorbar.visible or layer.visible
            shown.append(viewer.add_layer(layer) if new else layer)
        _stack_in_order(viewer.layers, shown)
    if shown:
        viewer.layers.selection.active = shown[-1]
    return shown


def _stack_in_order(layers, ordered: list[Layer]) -> None:
    """Move refilled and added layers so that they stack bottom to top as ``ordered``."""
    base = min((layers.index(layer) for layer in ordered), default=0)
    for offset, layer in enumerate(ordered):
        # the layers not yet placed all sit at or above base + offset: every move is downward
        src = layers.index(layer)
        if src != base + offset:
            layers.move(src, base + offset)


@contextlib.contextmanager
def _activate_once(layers):
    """Suspend napari's select-on-insert for a batch of adds (the caller selects once after).

    Uses the layer list's private ``_activate_on_insert`` switch when this napari has it;
    without it the adds simply select each layer as usual (slower, same end state)."""
    if not hasattr(layers, "_activate_on_insert"):
        yield
        return
    before = layers._activate_on_insert
    layers._activate_on_insert = False
    try:
        yield
    finally:
        layers._activate_on_insert = before


@contextlib.contextmanager
def _scene_graph_once(viewer):
    """Rebuild the canvas scene graph once after a batch of adds instead of after each.

    napari's own ``layers.batched_update()`` does this too, but ends with a full
    ``gc.collect()`` (~0.2 s on a big heap), so the canvas's private pause flag is used
    directly when this napari has it; otherwise the adds rebuild as usual."""
    qt_viewer = getattr(getattr(viewer, "window", None), "_qt_viewer", None)
    canvas = getattr(qt_viewer, "canvas", None)
    if not (hasattr(canvas, "_pause_scene_graph") and hasattr(canvas, "_update_scenegraph")):
        yield
        return
    before = canvas._pause_scene_graph
    canvas._pause_scene_graph = True
    try:
        yield
    finally:
        canvas._pause_scene_graph = before
        if not before:
            canvas._update_scenegraph()


def add_prediction_layers(viewer, prediction, *, normalisation: str = "percentile", smoothing: float = 0.0,
                          magnification: str | None = None) -> list[Layer]:
    """Build and add the overlay layers of ``prediction`` (the benchmarked path)."""
    tuples = prediction_layer_data(prediction, normalisation=normalisation, smoothing=smoothing,
                                   magnification=magnification)
    return add_layer_tuples(viewer, tuples, prediction=prediction)


def restyle_attention(layers, *, normalisation: str, smoothing: float, opacity: float | None = None,
                      colormaps: dict[str, str] | None = None, transparent_low: bool | None = None) -> None:
    """Recompute attention layers' display values from their raw grids (small, so instant);
    ``colormaps`` (subspace -> name) and ``transparent_low`` recolour them."""
    for layer in layers:
        if layer.metadata.get("dismm_kind") == "attention":
            data, limits = display_grid(layer.metadata["raw"], normalisation=normalisation, smoothing=smoothing)
            layer.data = data
            layer.contrast_limits = limits
            layer.metadata.update(normalisation=normalisation, smoothing=float(smoothing))
            subspace = layer.metadata.get("subspace")
            key = subspace if subspace == "TME" else "tumor"  # a single-map model's map: the tumor colours
            name = (colormaps or {}).get(key, layer.metadata.get("colormap_name"))
            fade = layer.metadata.get("transparent_low", True) if transparent_low is None else transparent_low
            if name is not None and (name, fade) != (layer.metadata.get("colormap_name"),
                                                     layer.metadata.get("transparent_low")):
                layer.colormap = overlay_colormap(name, transparent_low=fade)
                layer.metadata.update(colormap_name=name, transparent_low=bool(fade))
        if opacity is not None and layer.metadata.get("dismm_kind") in ("attention", "ita"):
            layer.opacity = opacity


def region_polygons(shapes: Shapes, slide: Image) -> list[list[tuple[float, float]]]:
    """A shapes layer's shapes as level-0 (x, y) polygons of the slide under it.

    Through the world frame, so a shapes layer drawn with any scale or translate works:
    the slide layer's data coordinate is level-0 ``c - 0.5`` (see `layers.prediction`).
    Rectangles and polygons are used as drawn; an ellipse counts as its bounding box;
    lines and paths of fewer than three vertices have no area and are left out."""
    out = []
    for vertices in shapes.data:
        vertices = np.asarray(vertices, dtype=np.float64)
        if len(vertices) < 3:
            continue
        world = np.array([shapes.data_to_world(v) for v in vertices])
        data = np.array([slide.world_to_data(w) for w in world])[:, -2:] + 0.5
        out.append([(float(x), float(y)) for y, x in data])
    return out


