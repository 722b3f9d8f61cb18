"""Layer-data tuples for a `Prediction`: attention grids, ITA tokens, tissue and patch points.

Pure functions (numpy, pandas, scipy): no viewer is needed to build them, so `npe2.read`
on a bundle returns exactly what the widget adds.

Placement in the slide's world frame (why the numbers are what they are)
------------------------------------------------------------------------
The slide layer (`viewer.layers.slide_layer_data`) has ``scale = (mpp, mpp)`` and no
translate, and napari puts the *centre* of data pixel ``j`` at world ``j * mpp``. Level-0
pixel ``j`` therefore covers world ``[(j - 0.5) * mpp, (j + 0.5) * mpp)``. Writing level-0
positions as continuous coordinates ``c`` (pixel ``j`` spans ``[j, j + 1)``, the convention
of patch boxes and tissue contours), world = ``(c - 0.5) * mpp`` and the slide layer's data
coordinate is ``c - 0.5``.

- Attention grids: cell ``i`` covers level-0 ``[x0 + i*step, x0 + (i+1)*step)``; its centre
  ``x0 + (i + 0.5) * step`` must land at world ``(x0 + (i + 0.5) * step - 0.5) * mpp``, hence
  ``scale = step * mpp`` and ``translate = (x0 + step / 2 - 0.5) * mpp``. The cell then covers
  exactly the world extent of the level-0 pixels it summarises.
- Points and shapes share the slide layer's data frame: data = ``c - 0.5`` with
  ``scale = (mpp, mpp)``; hovering reads the same coordinates as on the slide.
When mpp is unknown the world unit is one level-0 pixel (mpp = 1), as for the slide layer.

Overlapping patches are averaged on the grid, weighted by the area each patch covers of a
cell; cells no patch covers are NaN (rendered transparent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import pandas as pd

from napari_dismm.bundle import PATCH_COLUMNS
from napari_dismm.errors import DismmError
from napari_dismm.viewer.colormaps import overlay_colormap

LayerData = tuple[Any, dict[str, Any], str]

NORMALISATIONS = ("raw", "minmax", "percentile")
PERCENTILES = (1.0, 99.0)
SUBSPACES = {"tumor": ("tumor_attention", "inferno"), "TME": ("tme_attention", "viridis")}
#: models with one attention map and no subspaces: the bundle repeats the map in both
#: columns, the viewer shows it once under its own name
SINGLE_MAP_NAMES = {"mirror": "[CLS]", "abmil": "ABMIL"}


def attention_maps(model_kind: str | None) -> dict[str, tuple[str, str]]:
    """Layer name prefix -> (patches.csv column, default colormap) of the maps a model has."""
    single = SINGLE_MAP_NAMES.get(str(model_kind))
    return SUBSPACES if single is None else {single: ("tumor_attention", "inferno")}
NOTE = "Attention shows where the model looked; it is not evidence of disease."
#: above this many patch points the hover layer starts hidden: software OpenGL (Xvfb,
#: remote desktops) needs ~1 s per frame for 100k point sprites; a GPU does not care
POINTS_SHOWN_LIMIT = 20_000
#: a grid larger than this many cells per axis is coarsened (irregular coordinates)
MAX_CELLS = 8192


class PredictionLike(Protocol):
    slide_id: str
    slide_name: str
    mpp: float | None
    patches: pd.DataFrame
    tissue_contours: list


@dataclass(frozen=True)
class Grid:
    """A regular grid of cells over level 0 for one magnification."""

    origin: tuple[int, int]  # level-0 (x0, y0) of cell (0, 0)'s top-left corner
    step: tuple[int, int]  # level-0 (sx, sy) cell size
    shape: tuple[int, int]  # (rows, cols)

    def world(self, mpp: float) -> dict[str, tuple[float, float]]:
        """napari ``scale`` / ``translate`` (y, x) placing cell centres in the slide's world."""
        (x0, y0), (sx, sy) = self.origin, self.step
        return {
            "scale": (sy * mpp, sx * mpp),
            "translate": ((y0 + sy / 2 - 0.5) * mpp, (x0 + sx / 2 - 0.5) * mpp),
        }


# ---------------------------------------------------------------- grids


def _step(patches: pd.DataFrame) -> int:
    """The (square) grid step: gcd of the offsets between patch starts, refined by the patch size.

    A regular TRIDENT/CLAM grid gives its step exactly (and an overlapping one the gcd of
    step and size, so every cell is covered by whole patches). Irregular coordinates give
    a tiny gcd; then the patch size is the cell and patches spread over cells by area."""
    size = int(round(float(patches["width"].median())))
    diffs = [np.diff(np.unique(patches[c].to_numpy(np.int64))) for c in ("x", "y")]
    diffs = np.concatenate(diffs)
    floor = max(1.0, size / 8)
    step = int(np.gcd.reduce(diffs)) if len(diffs) else size
    if step < floor:
        return max(1, size)
    refined = int(np.gcd(step, size))
    return refined if refined >= floor else step


def grid_for(patches: pd.DataFrame) -> Grid:
    """The grid of one magnification's patches (level-0 px)."""
    x = patches["x"].to_numpy(np.int64)
    y = patches["y"].to_numpy(np.int64)
    sx = sy = _step(patches)
    x0, y0 = int(x.min()), int(y.min())
    x1 = int((x + patches["width"].to_numpy(np.int64)).max())
    y1 = int((y + patches["height"].to_numpy(np.int64)).max())
    cols, rows = math.ceil((x1 - x0) / sx), math.ceil((y1 - y0) / sy)
    while max(rows, cols) > MAX_CELLS:  # keep the grid small whatever the coordinates
        sx, sy = sx * 2, sy * 2
        cols, rows = math.ceil((x1 - x0) / sx), math.ceil((y1 - y0) / sy)
    return Grid(origin=(x0, y0), step=(sx, sy), shape=(rows, cols))


def _coverage(patches: pd.DataFrame, grid: Grid):
    """Yield (flat cell index, covered area, in-grid mask) for each cell offset a patch reaches."""
    (x0, y0), (sx, sy) = grid.origin, grid.step
    rows, cols = grid.shape
    px = patches["x"].to_numpy(np.float64) - x0
    py = patches["y"].to_numpy(np.float64) - y0
    pw = patches["width"].to_numpy(np.float64)
    ph = patches["height"].to_numpy(np.float64)
    c0 = np.floor(px / sx).astype(np.int64)
    r0 = np.floor(py / sy).astype(np.int64)
    span_c = int(np.max(np.ceil((px + pw) / sx) - c0)) if len(px) else 0
    span_r = int(np.max(np.ceil((py + ph) / sy) - r0)) if len(py) else 0
    for dr in range(span_r):
        r = r0 + dr
        oy = np.clip(np.minimum(py + ph, (r + 1) * sy) - np.maximum(py, r * sy), 0, None)
        for dc in range(span_c):
            c = c0 + dc
            ox = np.clip(np.minimum(px + pw, (c + 1) * sx) - np.maximum(px, c * sx), 0, None)
            area = ox * oy
            ok = (area > 0) & (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
            yield r * cols + c, area, ok


def mean_grid(patches: pd.DataFrame, values: np.ndarray, grid: Grid) -> np.ndarray:
    """Area-weighted mean of ``values`` over the patches covering each cell; NaN where none."""
    n = grid.shape[0] * grid.shape[1]
    total = np.zeros(n, dtype=np.float64)
    weight = np.zeros(n, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    for cell, area, ok in _coverage(patches, grid):
        total += np.bincount(cell[ok], weights=area[ok] * values[ok], minlength=n)
        weight += np.bincount(cell[ok], weights=area[ok], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(weight > 0, total / weight, np.nan)
    return out.reshape(grid.shape).astype(np.float32)


def label_grid(patches: pd.DataFrame, labels: np.ndarray, grid: Grid) -> np.ndarray:
    """Per cell, the label of the patch covering most of it (0 where none)."""
    n = grid.shape[0] * grid.shape[1]
    best = np.zeros(n, dtype=np.float64)
    out = np.zeros(n, dtype=np.int32)
    labels = np.asarray(labels, dtype=np.int32)
    for cell, area, ok in _coverage(patches, grid):
        cell, area, lab = cell[ok], area[ok], labels[ok]
        order = np.lexsort((-area, cell))  # per cell, largest area first
        cell, area, lab = cell[order], area[order], lab[order]
        first = np.ones(len(cell), dtype=bool)
        first[1:] = cell[1:] != cell[:-1]
        cell, area, lab = cell[first], area[first], lab[first]
        better = area > best[cell]
        best[cell[better]] = area[better]
        out[cell[better]] = lab[better]
    return out.reshape(grid.shape)


# ---------------------------------------------------------------- display values


def normalise(raw: np.ndarray, normalisation: str) -> tuple[np.ndarray, tuple[float, float]]:
    """Display values and contrast limits; NaN stays NaN.

    raw: the attention itself (limits 0..max); minmax: rescaled to [0, 1];
    percentile: rescaled between the 1st and 99th percentile and clipped to [0, 1]."""
    if normalisation not in NORMALISATIONS:
        raise DismmError(f"unknown normalisation {normalisation!r}; use one of {', '.join(NORMALISATIONS)}")
    finite = raw[np.isfinite(raw)]
    if finite.size == 0:
        return raw.astype(np.float32), (0.0, 1.0)
    if normalisation == "raw":
        hi = float(finite.max())
        return raw.astype(np.float32), (0.0, hi if hi > 0 else 1.0)
    if normalisation == "minmax":
        lo, hi = float(finite.min()), float(finite.max())
    else:
        lo, hi = (float(v) for v in np.percentile(finite, PERCENTILES))
    span = hi - lo if hi > lo else 1.0
    out = np.clip((raw - lo) / span, 0.0, 1.0) if normalisation == "percentile" else (raw - lo) / span
    return out.astype(np.float32), (0.0, 1.0)


def smooth(grid: np.ndarray, sigma: float) -> np.ndarray:
    """NaN-aware Gaussian smoothing in cells (normalised convolution); NaN cells stay NaN."""
    if sigma <= 0:
        return grid
    from scipy.ndimage import gaussian_filter

    known = np.isfinite(grid)
    num = gaussian_filter(np.where(known, grid, 0.0).astype(np.float64), sigma, mode="constant")
    den = gaussian_filter(known.astype(np.float64), sigma, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(known & (den > 0), num / den, np.nan)
    return out.astype(np.float32)


def display_grid(raw: np.ndarray, *, normalisation: str, smoothing: float) -> tuple[np.ndarray, tuple[float, float]]:
    """What an attention layer shows: smoothing first (on raw values), then normalisation."""
    return normalise(smooth(raw, smoothing), normalisation)


# ---------------------------------------------------------------- layers


def check_patches(patches: pd.DataFrame) -> None:
    missing = [c for c in PATCH_COLUMNS if c not in patches.columns]
    if missing:
        raise DismmError(f"prediction patches lack column(s) {', '.join(missing)}")


def magnifications_of(patches: pd.DataFrame) -> list[str]:
    """Magnifications present, coarsest first ("10x" before "20x")."""
    def power(label: str) -> float:
        try:
            return float(str(label).lower().removesuffix("x"))
        except ValueError:
            return math.inf
    return sorted({str(m) for m in patches["magnification"].unique()}, key=power)


def world_frame(prediction: PredictionLike) -> tuple[float, tuple[str, str]]:
    """(µm per level-0 pixel, layer units) of a prediction's slide; pixels when mpp is unknown."""
    if prediction.mpp:
        return float(prediction.mpp), ("um", "um")
    return 1.0, ("pixel", "pixel")


def prediction_layer_data(
    prediction: PredictionLike,
    *,
    normalisation: str = "percentile",
    smoothing: float = 0.0,
    magnification: str | None = None,
    colormaps: Mapping[str, str] | None = None,
    transparent_low: bool = True,
) -> list[LayerData]:
    """All overlay layers of one prediction, bottom to top.

    ``colormaps``: subspace (``"tumor"``, ``"TME"``) -> a :data:`~.colormaps.PERCEPTUAL`
    name, defaults per subspace; ``transparent_low``: the attention fades out towards the
    bottom of the contrast range (`viewer.colormaps`), so the tissue stays visible.

    ``magnification``: None = the finest present (what a pathologist looks at first),
    ``"all"`` = every magnification (only the finest visible), or a label such as ``"10x"``.
    napari costs ~0.1 s per added layer whatever its data (vispy visuals, overlays; software
    OpenGL, `benchmarks/bench_layers.py`), so fewer layers by default keeps opening fast."""
    patches = prediction.patches
    check_patches(patches)
    mpp, units = world_frame(prediction)
    present = magnifications_of(patches)
    if magnification is None:
        mags = present[-1:]
    elif magnification == "all":
        mags = present
    elif str(magnification) in present:
        mags = [str(magnification)]
    else:
        raise DismmError(f"the prediction has no {magnification} patches (it has {', '.join(present) or 'none'})")
    base = {"slide_id": prediction.slide_id, "slide_name": prediction.slide_name}
    layers: list[LayerData] = []
    tissue = tissue_layer_data(prediction, mpp=mpp, units=units)
    if tissue is not None:
        layers.append(tissue)
    by_mag = {m: patches[patches["magnification"].astype(str) == m] for m in mags}
    for mag in mags:
        rows = by_mag[mag]
        if rows.empty:
            continue
        visible = mag == mags[-1]  # finest magnification shown, the tumor map on top
        grid = grid_for(rows)
        place = grid.world(mpp)
        maps = attention_maps(getattr(prediction, "model_kind", None))
        for subspace, (column, colormap) in maps.items():
            raw = mean_grid(rows, rows[column].to_numpy(), grid)
            shown, limits = display_grid(raw, normalisation=normalisation, smoothing=smoothing)
            # a single-map model's map takes the tumor map's colours
            cmap_name = (colormaps or {}).get(subspace if subspace in SUBSPACES else "tumor", colormap)
            meta = {
                **base, "dismm_kind": "attention", "subspace": subspace, "magnification": mag,
                "raw": raw, "normalisation": normalisation, "smoothing": float(smoothing),
                "grid_origin": grid.origin, "grid_step": grid.step, "note": NOTE,
                "colormap_name": cmap_name, "transparent_low": bool(transparent_low),
            }
            layers.append((shown, {
                "name": f"{subspace} attention {mag}", **place, "units": units,
                "colormap": overlay_colormap(cmap_name, transparent_low=transparent_low),
                "contrast_limits": limits, "opacity": 0.6, "blending": "translucent",
                "visible": visible and subspace == next(iter(maps)),
                "interpolation2d": "nearest", "metadata": meta,
            }, "image"))
        layers.extend(_ita_layers(rows, grid, mag=mag, mpp=mpp, units=units, base=base, visible=visible))
    shown = pd.concat([by_mag[m] for m in mags]) if mags else patches.iloc[:0]
    if len(shown):
        layers.append(patch_points_data(shown, mpp=mpp, units=units, base=base))
    return layers


def _ita_layers(rows, grid: Grid, *, mag: str, mpp: float, units, base: dict, visible: bool) -> list[LayerData]:
    clusters = rows["ita_cluster"].to_numpy(np.int64)
    if not (clusters >= 0).any():
        return []  # the model has no ITA
    labels = label_grid(rows, clusters + 1, grid)
    out: list[LayerData] = [(labels, {
        "name": f"ITA tokens {mag}", **grid.world(mpp), "units": units, "opacity": 0.35, "visible": False,
        "metadata": {**base, "dismm_kind": "ita", "magnification": mag,
                     "description": "label k = patches merged into ITA token k-1; 0 = no token"},
    }, "labels")]
    centres = rows[rows["ita_centre"].astype(bool)]
    if len(centres):
        out.append((_centres_yx(centres), {
            "name": f"ITA centres {mag}", "scale": (mpp, mpp), "units": units, "symbol": "star",
            "size": float(np.median(centres["width"])) * 0.6, "face_color": "cyan", "border_color": "black",
            "visible": visible, "features": pd.DataFrame({"ita_cluster": centres["ita_cluster"].to_numpy()}),
            "metadata": {**base, "dismm_kind": "ita_centres", "magnification": mag},
        }, "points"))
    return out


def _centres_yx(rows: pd.DataFrame) -> np.ndarray:
    """(N, 2) patch centres in the slide layer's data frame (level-0 px, pixel-centre based)."""
    x = rows["x"].to_numpy(np.float64) + rows["width"].to_numpy(np.float64) / 2 - 0.5
    y = rows["y"].to_numpy(np.float64) + rows["height"].to_numpy(np.float64) / 2 - 0.5
    return np.stack([y, x], axis=1)


def patch_points_data(patches: pd.DataFrame, *, mpp: float, units, base: dict) -> LayerData:
    """A (nearly invisible) point per patch whose `features` show on hover."""
    features = pd.DataFrame({
        "tumor_attention": patches["tumor_attention"].to_numpy(np.float32),
        "tme_attention": patches["tme_attention"].to_numpy(np.float32),
        "ita_cluster": patches["ita_cluster"].to_numpy(np.int32),
        "magnification": pd.Categorical(patches["magnification"].astype(str)),
    })
    return (_centres_yx(patches), {
        "name": "patches", "scale": (mpp, mpp), "units": units, "features": features,
        "size": float(np.median(patches["width"])) * 0.5, "face_color": "transparent",
        "border_color": "white", "border_width": 0.0, "antialiasing": 0.0, "opacity": 0.3,
        "visible": len(patches) <= POINTS_SHOWN_LIMIT,
        "metadata": {**base, "dismm_kind": "patches",
                     "note": "hover a patch (layer selected and visible) to read its scores"},
    }, "points")


def tissue_layer_data(prediction: PredictionLike, *, mpp: float, units) -> LayerData | None:
    """Tissue outlines as polygons in the slide layer's data frame (None when there are none)."""
    rings = [np.asarray(ring, dtype=np.float64).reshape(-1, 2) for ring in prediction.tissue_contours or []]
    rings = [r for r in rings if len(r) >= 3]
    if not rings:
        return None
    polygons = [np.stack([r[:, 1] - 0.5, r[:, 0] - 0.5], axis=1) for r in rings]
    extent = max(float(np.ptp(np.concatenate(rings), axis=0).max()), 1.0)
    return (polygons, {
        "name": "tissue", "shape_type": "polygon", "scale": (mpp, mpp), "units": units,
        "face_color": "transparent", "edge_color": "lime", "edge_width": extent / 300, "opacity": 0.7,
        "metadata": {"slide_id": prediction.slide_id, "dismm_kind": "tissue"},
    }, "shapes")
