"""Layer-data tuples for a `Prediction`: attention grids, ITA tokens, tissue and patch points.

Pure functions (numpy, pandas, scipy): no viewer is needed to build them, so `npe2.read`
on a bundle returns exactly what the widget adds.

Placement in the slide's world frame (why the numbers are what they are)
------------------------------------------------------------------------
The slide layer (`viewer.layers.slide.slide_layer_data`) has ``scale = (mpp, mpp)`` and no
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

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import pandas as pd

from napari_dismm.bundle import PATCH_COLUMNS
from napari_dismm.errors import DismmError
from napari_dismm.patch_grid import (  # noqa: F401  (re-exported)
    MAX_CELLS,
    Grid,
    grid_for,
    label_grid,
    magnifications_of,
    mean_grid,
)
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


class PredictionLike(Protocol):
    slide_id: str
    slide_name: str
    mpp: float | None
    patches: pd.DataFrame
    tissue_contours: list


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
    if (getattr(prediction, "scope", None) or {}).get("region"):  # a drawn region's prediction, not the slide's
        for _, kwargs, _ in layers:
            if kwargs["metadata"].get("dismm_kind") != "tissue":
                kwargs["name"] = f"{kwargs['name']} (region)"
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
    """Tissue outlines as closed paths in the slide layer's data frame (None when there are none).

    Paths, not polygons: only the outline is drawn, and napari triangulates a polygon's face
    in pure Python even when it is transparent (1.5 s for the CMU slide's 1,209-vertex
    outline, against 0.01 s as a path)."""
    rings = [np.asarray(ring, dtype=np.float64).reshape(-1, 2) for ring in prediction.tissue_contours or []]
    rings = [r for r in rings if len(r) >= 3]
    if not rings:
        return None
    rings = [r if np.array_equal(r[0], r[-1]) else np.vstack([r, r[:1]]) for r in rings]
    paths = [np.stack([r[:, 1] - 0.5, r[:, 0] - 0.5], axis=1) for r in rings]
    extent = max(float(np.ptp(np.concatenate(rings), axis=0).max()), 1.0)
    return (paths, {
        "name": "tissue", "shape_type": "path", "scale": (mpp, mpp), "units": units,
        "face_color": "transparent", "edge_color": "lime", "edge_width": extent / 300, "opacity": 0.7,
        "metadata": {"slide_id": prediction.slide_id, "dismm_kind": "tissue"},
    }, "shapes")
