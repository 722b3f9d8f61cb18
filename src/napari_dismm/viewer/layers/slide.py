"""Layer-data tuples for a slide, built in one place.

napari, `npe2.read` and `dismm view` all receive the same tuples, so what a script reads
without a viewer is exactly what the viewer shows."""

from __future__ import annotations

import dataclasses
from typing import Any

from napari_dismm.slide import Slide

LayerData = tuple[Any, dict[str, Any], str]


def world_scale(slide: Slide) -> tuple[float, float]:
    """(y, x) size of a level-0 pixel in the world frame: µm when mpp is known, else 1 px."""
    mpp = slide.info.mpp
    return (mpp, mpp) if mpp else (1.0, 1.0)


def world_units(slide: Slide) -> tuple[str, str]:
    return ("um", "um") if slide.info.mpp else ("pixel", "pixel")


def slide_layer_data(slide: Slide, *, name: str | None = None) -> LayerData:
    """The slide as a lazy multiscale RGB image layer placed in µm."""
    info = slide.info
    metadata = {
        "dismm_kind": "slide",
        "slide_info": dataclasses.asdict(info),
        "slide_path": str(info.path),
        "slide_id": info.slide_id,
    }
    slide.keep_overview()  # napari reads the smallest level twice (thumbnail, first view)
    if info.mpp is None:
        metadata["warning"] = "microns per pixel unknown: the layer is in pixels"
    kwargs = {
        "name": name or _display_name(info.path),
        "multiscale": True,
        "rgb": True,
        "contrast_limits": (0, 255),
        "scale": world_scale(slide),
        "translate": (0.0, 0.0),
        "units": world_units(slide),
        "metadata": metadata,
    }
    return (slide.pyramid, kwargs, "image")


def _display_name(path: str) -> str:
    from pathlib import Path

    return Path(path).name
