"""Layer data and pixels for the subspace comparison view (pure numpy; no viewer needed).

- The diverging layer: per patch, tumor minus TME attention, each first scaled by the
  number of patches of its magnification (so 1 = uniform attention and the two maps are
  comparable whatever the bag size); drawn on the patch grid of
  :mod:`napari_dismm.viewer.layers.prediction`, symmetric contrast limits around 0.
- The linked patch points: one point per patch of one magnification, in the slide
  layer's data frame (level-0 px) with ``scale = (mpp, mpp)``; point i is row i of
  :func:`patch_rows`, which is also the order of the scatter.
- Thumbnails: a patch read lazily from the slide layer's pyramid at the level closest to
  (and not coarser than) the model's magnification, so only the pixels shown are read.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from napari_dismm.errors import DismmError
from napari_dismm.errors import SlideError
from napari_dismm.tiling import magnification_to_mpp
from napari_dismm.viewer.layers.prediction import (LayerData, _centres_yx, grid_for, magnifications_of, mean_grid,
                                                  world_frame)

DIVERGING_COLORMAP = "PiYG"  # green (positive) = tumor attends more, pink (negative) = TME attends more


def patch_rows(patches: pd.DataFrame, magnification: str | None = None) -> tuple[pd.DataFrame, str]:
    """The patches of one magnification (None = the finest), index reset: row i = point i."""
    present = magnifications_of(patches)
    if not present:
        raise DismmError("the prediction has no patches")
    mag = present[-1] if magnification is None else str(magnification)
    if mag not in present:
        raise DismmError(f"the prediction has no {mag} patches (it has {', '.join(present)})")
    rows = patches[patches["magnification"].astype(str) == mag].reset_index(drop=True)
    return rows, mag


def relative_attention(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(tumor, TME) attention times the number of patches: 1 = uniform."""
    n = len(rows)
    return rows["tumor_attention"].to_numpy(np.float64) * n, rows["tme_attention"].to_numpy(np.float64) * n


def difference_layer_data(prediction, rows: pd.DataFrame, mag: str) -> LayerData:
    """Tumor minus TME relative attention on the patch grid, a diverging colormap at 0."""
    tumor, tme = relative_attention(rows)
    grid = grid_for(rows)
    raw = mean_grid(rows, tumor - tme, grid)
    finite = np.abs(raw[np.isfinite(raw)])
    limit = float(np.percentile(finite, 99)) if finite.size else 1.0
    limit = limit if limit > 0 else 1.0
    mpp, units = world_frame(prediction)
    return (raw, {
        "name": f"tumor - TME attention {mag}", **grid.world(mpp), "units": units, "colormap": DIVERGING_COLORMAP,
        "contrast_limits": (-limit, limit), "opacity": 0.7, "blending": "translucent", "interpolation2d": "nearest",
        "metadata": {"slide_id": prediction.slide_id, "dismm_kind": "inspect_difference", "magnification": mag,
                     "raw": raw, "note": "relative attention (x number of patches): tumor minus TME; 0 = equal"},
    }, "image")


def linked_points_data(prediction, rows: pd.DataFrame, mag: str) -> LayerData:
    """One point per patch (row order), for selecting on the slide and highlighting."""
    tumor, tme = relative_attention(rows)
    mpp, units = world_frame(prediction)
    return (_centres_yx(rows), {
        "name": f"inspect patches {mag}", "scale": (mpp, mpp), "units": units,
        "features": pd.DataFrame({"tumor_relative": tumor, "tme_relative": tme}),
        "size": float(np.median(rows["width"])) * 0.6, "face_color": "transparent", "border_color": "yellow",
        "border_width": 0.0, "opacity": 0.9,
        "metadata": {"slide_id": prediction.slide_id, "dismm_kind": "inspect_points", "magnification": mag},
    }, "points")


# ---------------------------------------------------------------- thumbnails


def magnification_mpp(mag: str) -> float | None:
    """µm per pixel of a magnification label ("20x" -> 0.5), None if it is not one."""
    try:
        return magnification_to_mpp(mag)
    except SlideError:
        return None


def pick_level(shapes: list[tuple[int, ...]], downsample: float) -> tuple[int, float]:
    """(level, its downsample): the coarsest level not coarser than ``downsample``."""
    base = shapes[0][0]
    best, best_ds = 0, 1.0
    for i, shape in enumerate(shapes):
        ds = base / shape[0]
        if ds <= downsample * 1.01 and ds >= best_ds:
            best, best_ds = i, ds
    return best, best_ds


def read_patch(levels, row: pd.Series, *, slide_mpp: float | None, mag: str, size: int = 96) -> np.ndarray:
    """The patch of ``row`` as a (size, size, 3) uint8 thumbnail, read from one pyramid level.

    ``levels``: the slide layer's multiscale data (level 0 first, arrays of (H, W, 3))."""
    from PIL import Image

    target = magnification_mpp(mag)
    width = float(row["width"])
    wanted = (target / slide_mpp) if (target and slide_mpp) else width / 224.0
    shapes = [tuple(level.shape) for level in levels]
    level, ds = pick_level(shapes, max(wanted, 1.0))
    array = levels[level]
    h, w = shapes[level][:2]
    y0, x0 = int(row["y"] / ds), int(row["x"] / ds)
    y1, x1 = int(np.ceil((row["y"] + row["height"]) / ds)), int(np.ceil((row["x"] + width) / ds))
    y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
    if y1 <= y0 or x1 <= x0:
        return np.zeros((size, size, 3), np.uint8)
    pixels = np.asarray(array[y0:y1, x0:x1])[..., :3].astype(np.uint8)
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))


def gallery_indices(values: np.ndarray, *, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Row indices of the ``k`` highest, the ``k`` lowest and ``k`` random patches (baseline)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(-values, kind="stable")
    k = min(k, len(values))
    rng = np.random.default_rng(seed)
    return {"top": order[:k], "bottom": order[::-1][:k], "random": np.sort(rng.choice(len(values), k, replace=False))}


def patch_centre_world(row: pd.Series, mpp: float | None) -> tuple[float, float]:
    """(y, x) world position of a patch centre, as the slide layer places pixels."""
    scale = float(mpp) if mpp else 1.0
    return ((row["y"] + row["height"] / 2 - 0.5) * scale, (row["x"] + row["width"] / 2 - 0.5) * scale)
