"""Slide metadata: the frozen `SlideInfo` record and the microns-per-pixel chain.

mpp chain, first hit wins:
1. ``user`` — an explicit override always wins, even over a vendor value, because a user
   only passes one when they know the file is wrong (re-scanned, mis-calibrated, exported
   without metadata). It is recorded as source ``"user"`` so provenance stays honest.
2. ``vendor`` — the scanner's own metadata (OpenSlide ``openslide.mpp-x/y`` of a vendor
   format, or OME ``PhysicalSizeX/Y``).
3. ``tiff-resolution`` — TIFF XResolution/YResolution in cm or inch (OpenSlide reports these
   for generic TIFF; we read them ourselves when OpenSlide cannot open the file). Values
   outside [0.01, 100] µm/px (e.g. the 72 dpi of a screenshot) are ignored.
4. ``unknown`` — mpp is None; callers that need it use `Slide.require_mpp`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import SlideError

MPP_SOURCES = ("vendor", "tiff-resolution", "user", "unknown")
_PLAUSIBLE_MPP = (0.01, 100.0)

#: Prefix of our own content hash, so it is never mistaken for an OpenSlide quickhash-1
#: (which is 64 bare hex digits).
CONTENT_HASH_PREFIX = "dismm-sha256:"


@dataclass(frozen=True)
class SlideInfo:
    """What a caller needs to know about a slide without reading pixels."""

    path: str
    slide_id: str
    vendor: str
    backend: str  # "tifffile" | "openslide"
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height), level 0 first
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: str
    objective_power: float | None
    background: tuple[int, int, int]
    tile_size: tuple[int, int]  # chunk of the level arrays (width, height) at level 0
    mpp_x: float | None = None
    mpp_y: float | None = None

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)


def plausible_mpp(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and _PLAUSIBLE_MPP[0] <= value <= _PLAUSIBLE_MPP[1]


def check_user_mpp(mpp: float | None) -> float | None:
    """Validate an override: a positive finite number or None."""
    if mpp is None:
        return None
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise SlideError(f"mpp override must be a number, got {mpp!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise SlideError(f"mpp override must be a positive number of µm per pixel, got {mpp!r}")
    return value


def resolve_mpp(
    *,
    user: float | None,
    vendor: tuple[float, float] | None,
    tiff_resolution: tuple[float, float] | None,
) -> tuple[float | None, float | None, str]:
    """Apply the chain; returns (mpp_x, mpp_y, source)."""
    if user is not None:
        return user, user, "user"
    for xy, source in ((vendor, "vendor"), (tiff_resolution, "tiff-resolution")):
        if xy is not None and plausible_mpp(xy[0]) and plausible_mpp(xy[1]):
            return float(xy[0]), float(xy[1]), source
    return None, None, "unknown"


def parse_float(value: object) -> float | None:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def parse_hex_colour(value: str | None) -> tuple[int, int, int]:
    """OpenSlide's ``openslide.background-color`` is ``RRGGBB``; white when absent or bad."""
    if value and len(value) == 6:
        try:
            return tuple(int(value[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
        except ValueError:
            pass
    return (255, 255, 255)
