"""Patch tables on a regular grid of level-0 cells: the common ground of maps and exports.

Pure numpy and pandas: the viewer's attention layers and the pyramidal overlay TIFF
(`napari_dismm.overlay_tiff`) both paint from these grids, so what a WSI viewer overlays
is what napari shows. Overlapping patches are averaged on the grid, weighted by the area
each patch covers of a cell; cells no patch covers are NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

#: a grid larger than this many cells per axis is coarsened (irregular coordinates)
MAX_CELLS = 8192


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


def magnifications_of(patches: pd.DataFrame) -> list[str]:
    """Magnifications present, coarsest first ("10x" before "20x")."""
    def power(label: str) -> float:
        try:
            return float(str(label).lower().removesuffix("x"))
        except ValueError:
            return math.inf
    return sorted({str(m) for m in patches["magnification"].unique()}, key=power)
