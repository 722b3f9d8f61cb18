"""Overlay colormaps whose low end fades out, so the H&E under a heatmap stays readable.

Why: an attention map drawn opaquely hides the tissue exactly where nothing is happening
(most of the slide). Here the alpha ramps with the value: 0 at the bottom of the contrast
range, fully opaque from :data:`ALPHA_FULL_AT` up; the colours are matplotlib's perceptual
(uniform-lightness) maps. Pure numpy + matplotlib: the colormap travels in a layer-data
tuple as napari's colormap dict, so `npe2.read` returns it without a viewer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: perceptually uniform maps offered in the widget (first = tumor default, second = TME)
PERCEPTUAL = ("inferno", "viridis", "magma", "plasma", "cividis")
#: the fraction of the contrast range at which the overlay becomes fully opaque
ALPHA_FULL_AT = 0.5
N_COLOURS = 256


def alpha_ramp(values: np.ndarray, *, full_at: float = ALPHA_FULL_AT) -> np.ndarray:
    """Opacity of normalised values: linear from 0 at 0 to 1 at ``full_at``, then 1."""
    return np.clip(np.asarray(values, dtype=np.float64) / float(full_at), 0.0, 1.0)


def overlay_colormap(name: str, *, transparent_low: bool = True, n: int = N_COLOURS) -> dict[str, Any]:
    """napari colormap dict (``colors``, ``controls``, ``name``) of a perceptual map.

    ``transparent_low``: alpha ramps with the value (:func:`alpha_ramp`); otherwise opaque.
    The name is fixed by the parameters, so napari's colormap registry never sees one
    name with two different colour tables."""
    if name not in PERCEPTUAL:
        from napari_dismm.errors import DismmError

        raise DismmError(f"unknown colormap {name!r}; use one of {', '.join(PERCEPTUAL)}")
    from matplotlib import colormaps

    controls = np.linspace(0.0, 1.0, n)
    colours = np.asarray(colormaps[name](controls), dtype=np.float32)
    if transparent_low:
        colours[:, 3] = alpha_ramp(controls)
    suffix = f" fading {ALPHA_FULL_AT:g}" if transparent_low else ""
    return {"name": f"dismm {name}{suffix}", "colors": colours, "controls": controls.astype(np.float32)}
