"""Turn decoded samples into the RGB uint8 the viewer shows.

Alpha is composited onto the slide's background colour (never left black or transparent):
``out = c * a + bg * (1 - a)`` for unassociated alpha, ``out = c + bg * (1 - a)`` for
associated (premultiplied) alpha, rounded to nearest.
"""

from __future__ import annotations

import numpy as np

ALPHA_NONE, ALPHA_ASSOCIATED, ALPHA_UNASSOCIATED = 0, 1, 2


def composite(
    rgb: np.ndarray, alpha: np.ndarray, background: tuple[int, int, int], *, premultiplied: bool
) -> np.ndarray:
    """Composite (h, w, 3) uint8 colour with (h, w) uint8 alpha onto a solid background."""
    a = alpha.astype(np.uint16)[..., None]
    if np.all(alpha == 255):
        return np.ascontiguousarray(rgb)
    bg = np.asarray(background, dtype=np.uint16)
    if premultiplied:
        out = rgb.astype(np.uint16) + (bg * (255 - a) + 127) // 255
    else:
        out = (rgb.astype(np.uint16) * a + bg * (255 - a) + 127) // 255
    return np.minimum(out, 255).astype(np.uint8)


def to_rgb(
    samples: np.ndarray,
    *,
    background: tuple[int, int, int],
    alpha: int = ALPHA_NONE,
    invert: bool = False,
    colormap: np.ndarray | None = None,
) -> np.ndarray:
    """(h, w, s) samples of any supported layout -> (h, w, 3) uint8 RGB.

    s = 1 grey (or palette index), 2 grey + alpha, 3 RGB, >= 4 RGB + alpha/extra.
    uint16 is scaled to 8 bits by dropping the low byte (a display choice, documented).
    """
    if samples.ndim == 2:
        samples = samples[..., None]
    if colormap is not None:
        lut = (colormap >> 8).astype(np.uint8) if colormap.dtype != np.uint8 else colormap
        rgb = np.moveaxis(lut[:, samples[..., 0]], 0, -1)
        return np.ascontiguousarray(rgb)
    if samples.dtype == np.uint16:
        samples = (samples >> 8).astype(np.uint8)
    elif samples.dtype == bool:
        samples = samples.astype(np.uint8) * 255
    n = samples.shape[-1]
    if n in (1, 2):
        colour = np.repeat(samples[..., :1], 3, axis=-1)
    else:
        colour = samples[..., :3]
    if invert:
        colour = 255 - colour
    has_alpha = alpha != ALPHA_NONE and (n == 2 or n >= 4)
    if has_alpha:
        a = samples[..., 1] if n == 2 else samples[..., 3]
        return composite(colour, a, background, premultiplied=alpha == ALPHA_ASSOCIATED)
    return np.ascontiguousarray(colour)
