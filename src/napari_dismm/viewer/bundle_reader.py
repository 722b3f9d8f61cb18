"""Prediction bundles as layers, for the reader and for `dismm view SLIDE BUNDLE`.

A bundle written by `dismm predict` on a GPU machine is browsed later on a laptop: the
reader turns its directory into the same layer-data tuples the widget adds after a run.
The bundle stores the slide's id, not its path, so the slide is opened separately; when
the caller knows which slide is shown, a bundle computed from another slide is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

from napari_dismm.viewer.layers.prediction import LayerData, prediction_layer_data


def is_bundle(path: str | os.PathLike) -> bool:
    from napari_dismm.bundle import is_bundle_dir

    return is_bundle_dir(path)


def read_bundle_layers(
    path: str | os.PathLike,
    *,
    slide_id: str | None = None,
    normalisation: str = "percentile",
    smoothing: float = 0.0,
) -> list[LayerData]:
    """The prediction layers of a bundle directory.

    ``slide_id``: the quickhash of the slide on screen; a bundle for another slide raises
    `BundleMismatchError` (a `DismmError`) naming both. The `Prediction` itself rides in
    each layer's metadata (``"dismm_prediction"``, a reference) so the widget's panel can
    show it."""
    from napari_dismm.bundle import read_bundle
    from napari_dismm.predict import check_bundle_matches_slide

    prediction = read_bundle(Path(path))
    if slide_id is not None:
        check_bundle_matches_slide(prediction, slide_id)
    layers = prediction_layer_data(prediction, normalisation=normalisation, smoothing=smoothing)
    for _, kwargs, _ in layers:
        kwargs["metadata"]["bundle_path"] = str(path)
        kwargs["metadata"]["dismm_prediction"] = prediction
    return layers
