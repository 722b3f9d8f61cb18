"""Tissue detection on a low-resolution view of a slide.

Why saturation: H&E (and most stains) colour tissue, while glass is white or grey and
scanner padding is white or black; all of those have low HSV saturation. Very dark
pixels are dropped as well because near-black noise has a high saturation ratio.
The mask is computed at a coarse, fixed physical resolution (default 8 µm/px) so that
every size parameter is in microns and means the same on every scanner.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.measure import find_contours

from napari_dismm.errors import DismmWarning, SlideError

#: microns per pixel assumed when the slide's mpp is unknown (a typical 40x scan); only
#: used to choose the thumbnail size, whose pixels are then taken to be ``mask_mpp``.
NOMINAL_MPP = 0.25


class _SlideLike(Protocol):
    info: Any

    def thumbnail(self, *, max_size: int = 1024) -> np.ndarray: ...


@dataclass(frozen=True)
class TissueParams:
    """Tissue detection settings; sizes are physical so they do not depend on the mask size."""

    mask_mpp: float = 8.0
    """Target resolution of the mask in µm/px (coarser = faster, blockier)."""
    max_size: int = 4096
    """Upper bound on the mask's longest side in pixels."""
    min_size: int = 256
    """Lower bound on the mask's longest side (never above the slide's own size)."""
    sigma_um: float = 8.0
    """Gaussian blur of the saturation channel before thresholding, in µm."""
    saturation_threshold: float | None = None
    """Fixed HSV saturation threshold in (0, 1); None means Otsu on the slide."""
    min_saturation: float = 0.05
    """Floor for the Otsu threshold, so a blank slide does not split its noise into 'tissue'."""
    dark_value: float = 0.1
    """Pixels whose HSV value (max channel / 255) is below this are never tissue."""
    min_area_um2: float = 20_000.0
    """Tissue pieces smaller than this are dropped (default ~0.02 mm²)."""
    min_hole_um2: float = 10_000.0
    """Holes inside tissue smaller than this are filled."""
    closing_um: float = 16.0
    """Radius of the morphological closing that joins nearby fragments, in µm."""

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("mask_mpp", 0.0 < self.mask_mpp <= 1000.0, "in (0, 1000]"),
            ("max_size", 16 <= self.max_size <= 65536, "in [16, 65536]"),
            ("min_size", 1 <= self.min_size <= self.max_size, "in [1, max_size]"),
            ("sigma_um", 0.0 <= self.sigma_um <= 1000.0, "in [0, 1000]"),
            ("min_saturation", 0.0 <= self.min_saturation < 1.0, "in [0, 1)"),
            ("dark_value", 0.0 <= self.dark_value < 1.0, "in [0, 1)"),
            ("min_area_um2", self.min_area_um2 >= 0.0, ">= 0"),
            ("min_hole_um2", self.min_hole_um2 >= 0.0, ">= 0"),
            ("closing_um", 0.0 <= self.closing_um <= 10_000.0, "in [0, 10000]"),
        ]
        if self.saturation_threshold is not None:
            ok = 0.0 < self.saturation_threshold < 1.0
            checks.append(("saturation_threshold", ok, "in (0, 1) or None"))
        for name, ok, bounds in checks:
            value = getattr(self, name)
            if not ok or (isinstance(value, float) and math.isnan(value)):
                raise SlideError(f"tissue parameter {name}={value!r} must be {bounds}")


@dataclass(frozen=True)
class TissueContour:
    """One closed boundary in level-0 (x, y) coordinates; holes bound background inside tissue."""

    xy: np.ndarray
    hole: bool


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask and how it maps onto level 0.

    Mask pixel (row r, col c) covers the level-0 box [c*dx, (c+1)*dx) x [r*dy, (r+1)*dy),
    with (dx, dy) = ``downsample`` exactly level-0 size / mask size per axis.
    """

    mask: np.ndarray
    downsample: tuple[float, float]
    level0_size: tuple[int, int]
    threshold: float
    slide_id: str | None = None
    contours: tuple[TissueContour, ...] = field(default=(), repr=False)

    @property
    def empty(self) -> bool:
        return not bool(self.mask.any())

    @property
    def outer(self) -> list[np.ndarray]:
        return [c.xy for c in self.contours if not c.hole]

    @property
    def holes(self) -> list[np.ndarray]:
        return [c.xy for c in self.contours if c.hole]

    @cached_property
    def _integral(self) -> np.ndarray:
        # summed-area table with a zero first row/column: S[j, i] = mask[:j, :i].sum()
        dtype = np.int32 if self.mask.size < 2**31 else np.int64  # exact counts, half the memory
        table = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), dtype=dtype)
        np.cumsum(np.cumsum(self.mask, axis=0, dtype=dtype), axis=1, out=table[1:, 1:])
        return table

    def _area_below(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tissue area (mask px²) in [0, x) x [0, y), x and y in (fractional) mask pixels.

        The mask is piecewise constant, so this integral is exactly the bilinear
        interpolation of the summed-area table.
        """
        table = self._integral
        h, w = self.mask.shape
        x = np.clip(x, 0.0, w)
        y = np.clip(y, 0.0, h)
        i = np.minimum(np.floor(x).astype(np.int64), max(w - 1, 0))
        j = np.minimum(np.floor(y).astype(np.int64), max(h - 1, 0))
        a = x - i
        b = y - j
        return (
            (1 - a) * (1 - b) * table[j, i]
            + a * (1 - b) * table[j, i + 1]
            + (1 - a) * b * table[j + 1, i]
            + a * b * table[j + 1, i + 1]
        )

    def fractions_in(self, boxes: np.ndarray) -> np.ndarray:
        """Tissue fraction of each level-0 box (x0, y0, w0, h0); outside the slide counts as none."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if self.mask.size == 0 or len(boxes) == 0:
            return np.zeros(len(boxes), dtype=np.float64)
        dx, dy = self.downsample
        x0, y0 = boxes[:, 0] / dx, boxes[:, 1] / dy
        x1, y1 = (boxes[:, 0] + boxes[:, 2]) / dx, (boxes[:, 1] + boxes[:, 3]) / dy
        area = (x1 - x0) * (y1 - y0)
        tissue = (
            self._area_below(x1, y1)
            - self._area_below(x0, y1)
            - self._area_below(x1, y0)
            + self._area_below(x0, y0)
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(area > 0, tissue / area, 0.0)
        return np.clip(frac, 0.0, 1.0)

    def fraction_in(self, x0: float, y0: float, w0: float, h0: float) -> float:
        """Tissue fraction of one level-0 box."""
        return float(self.fractions_in(np.array([[x0, y0, w0, h0]]))[0])


def require_tissue(mask: TissueMask, *, name: str | None = None) -> TissueMask:
    """Raise the caller-facing error for a slide where no tissue was found; ``name`` (the
    slide's file name) names it, else its id."""
    if mask.empty:
        name = name or mask.slide_id or "<slide>"
        raise SlideError(
            f"no tissue found in {name}: the detector kept no region "
            f"(saturation threshold {mask.threshold:.3f}); check that the slide shows stained tissue "
            "(blank, pen-only or very faint scans have none)"
        )
    return mask


def detect_tissue(
    source: _SlideLike | np.ndarray,
    *,
    params: TissueParams | None = None,
    mpp: float | None = None,
    level0_size: tuple[int, int] | None = None,
) -> TissueMask:
    """Detect tissue on a slide (read via its thumbnail) or on an RGB array.

    For an array, ``level0_size`` is the (width, height) of level 0 the array shows
    (default: the array is level 0) and ``mpp`` the level-0 µm/px. A slide supplies both.
    """
    params = params or TissueParams()
    slide_id = None
    if isinstance(source, np.ndarray):
        rgb = source
        if level0_size is None:
            level0_size = (int(rgb.shape[1]), int(rgb.shape[0]))
    else:
        info = source.info
        slide_id = getattr(info, "slide_id", None)
        level0_size = tuple(int(v) for v in info.level_dimensions[0])  # type: ignore[assignment]
        if mpp is None:
            mpp = info.mpp
        rgb = source.thumbnail(max_size=_mask_size(level0_size, mpp, params))
    rgb = _check_rgb(rgb)
    w0, h0 = level0_size
    if w0 <= 0 or h0 <= 0:
        raise SlideError(f"level-0 size must be positive, got {level0_size}")
    downsample = (w0 / rgb.shape[1], h0 / rgb.shape[0])
    if mpp is None:
        warnings.warn(
            "slide mpp unknown: the mask is taken to be at "
            f"{params.mask_mpp:g} µm/px for its size thresholds",
            DismmWarning,
            stacklevel=2,
        )
        px_um = params.mask_mpp
    else:
        px_um = mpp * math.sqrt(downsample[0] * downsample[1])  # µm per mask pixel
    mask, threshold = _segment(rgb, params=params, px_um=px_um)
    contours = _contours(mask, downsample) if mask.any() else ()
    return TissueMask(
        mask=mask,
        downsample=downsample,
        level0_size=(int(w0), int(h0)),
        threshold=threshold,
        slide_id=slide_id,
        contours=contours,
    )


def _mask_size(level0_size: tuple[int, int], mpp: float | None, params: TissueParams) -> int:
    """Longest side of the mask: the slide at ``params.mask_mpp``, within the size bounds."""
    longest = max(level0_size)
    scale = (mpp if mpp is not None else NOMINAL_MPP) / params.mask_mpp
    size = math.ceil(longest * scale)
    return int(min(max(size, params.min_size), params.max_size, longest))


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim == 3 and rgb.shape[2] == 4:
        rgb = rgb[..., :3]
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise SlideError(f"tissue detection needs an (h, w, 3) RGB image, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise SlideError(f"tissue detection needs a uint8 image, got {rgb.dtype}")
    return rgb


def _segment(rgb: np.ndarray, *, params: TissueParams, px_um: float) -> tuple[np.ndarray, float]:
    """Blurred-saturation threshold, dark-pixel exclusion, then morphological clean-up."""
    rgbf = rgb.astype(np.float32) / 255.0
    value = rgbf.max(axis=2)
    spread = value - rgbf.min(axis=2)
    saturation = np.divide(spread, value, out=np.zeros_like(value), where=value > 0)
    sigma = params.sigma_um / px_um
    if sigma > 0:
        saturation = ndimage.gaussian_filter(saturation, sigma)
        value = ndimage.gaussian_filter(value, sigma)
    bright = value >= params.dark_value
    # dark pixels join the unsaturated (background) mode, so black padding is not tissue
    saturation = np.where(bright, saturation, 0.0)
    threshold = params.saturation_threshold
    if threshold is None:
        otsu = 1.0
        if float(saturation.max()) > float(saturation.min()):
            otsu = float(threshold_otsu(saturation))
        threshold = max(otsu, params.min_saturation)
    mask = bright & (saturation > threshold)

    radius = int(round(params.closing_um / px_um))
    if radius > 0 and mask.any():
        # pad so closing does not erode tissue touching the border
        padded = np.pad(mask, radius)
        padded = ndimage.binary_closing(padded, structure=_disk(radius))
        mask = padded[radius:-radius, radius:-radius]
    px_area = px_um * px_um
    mask = _fill_small_holes(mask, max_area=params.min_hole_um2 / px_area)
    mask = _drop_small_objects(mask, min_area=params.min_area_um2 / px_area)
    return mask, float(threshold)


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (xx * xx + yy * yy) <= radius * radius


def _drop_small_objects(mask: np.ndarray, *, min_area: float) -> np.ndarray:
    if min_area <= 0 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, *, max_area: float) -> np.ndarray:
    """Fill background components smaller than ``max_area`` that do not touch the border."""
    if max_area <= 0 or not mask.any():
        return mask
    labels, n = ndimage.label(~mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    border = np.unique(
        np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    )
    fill = sizes < max_area
    fill[0] = False
    fill[border] = False
    return mask | fill[labels]


def _contours(mask: np.ndarray, downsample: tuple[float, float]) -> tuple[TissueContour, ...]:
    """Closed boundaries in level-0 coordinates, outer ones and holes told apart by winding."""
    padded = np.pad(mask.astype(np.float32), 1)
    dx, dy = downsample
    out = []
    for rc in find_contours(padded, 0.5, positive_orientation="high"):
        # padded index -> mask pixel centre -> level-0 coordinate
        x = (rc[:, 1] - 1.0 + 0.5) * dx
        y = (rc[:, 0] - 1.0 + 0.5) * dy
        signed = 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))
        # with 'high' orientation, tissue outlines wind negatively in (x, y) image axes
        out.append(TissueContour(xy=np.stack([x, y], axis=1), hole=signed > 0))
    return tuple(out)
