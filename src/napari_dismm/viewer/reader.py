"""napari reader contribution: returns None for paths it cannot read, a callable otherwise.

No reading logic here: slides are opened by `napari_dismm.slide`, layers built by
`napari_dismm.viewer.layers`; prediction bundle directories (written by `dismm predict`)
become layers in `napari_dismm.viewer.bundle_reader`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from napari_dismm.slide import is_slide_path


def napari_get_reader(path: str | Sequence[str]) -> Callable | None:
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_readable(p) for p in paths):
        return None
    return read_paths


def _readable(path) -> bool:
    from napari_dismm.bundle import is_bundle_dir  # lazy: keeps plugin discovery light

    path = os.fspath(path)
    return is_bundle_dir(path) or (os.path.isfile(path) and is_slide_path(path))


def read_paths(path: str | Sequence[str]) -> list:
    from napari_dismm.bundle import is_bundle_dir
    from napari_dismm.slide import open_slide
    from napari_dismm.viewer.bundle_reader import read_bundle_layers
    from napari_dismm.viewer.layers.slide import slide_layer_data

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: list = []
    for p in map(os.fspath, paths):
        if is_bundle_dir(p):
            layers.extend(read_bundle_layers(p))
        else:
            layers.append(slide_layer_data(open_slide(p)))
    return layers
