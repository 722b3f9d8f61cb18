"""Attention maps as tiled pyramidal TIFFs aligned with the slide, for any WSI viewer.

Why this shape:
- Level 0 has the slide's own level-0 size and its resolution tags (pixels per cm, so
  OpenSlide reports ``openslide.mpp-x``): a viewer that overlays two slides of the same
  size and mpp puts every patch's value exactly on the patch's pixels.
- Reduced levels are successive pages with ``subfiletype=1`` (OpenSlide does not see
  SubIFD pyramids), each half the previous one, until a level fits in one tile.
- 8-bit grayscale (every viewer and OpenSlide decode it): 0 = no patch (no tissue), and
  ``v`` in 1..255 is the attention ``lo + (v - 1) / 254 * (hi - lo)`` with the map's own
  minimum and maximum, which the ImageDescription records as JSON. The map is the
  prediction's grid (`patch_grid`, the mean of the patches covering a cell), the same
  values the viewer's attention layer shows raw.
- Tiles are painted from the cell grid on the fly, so a 60,000 x 40,000 px slide never
  needs a full-resolution array in memory; PackBits (every TIFF reader has it) encodes a
  tile ~3x faster than deflate, and a tile of one value is encoded once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from napari_dismm.patch_grid import Grid, grid_for, magnifications_of, mean_grid

TILE = 256
#: subspace -> patch-table column
MAPS = {"tumor": "tumor_attention", "tme": "tme_attention"}


def overlay_name(subspace: str, magnification: str) -> str:
    """Bundle file name of one attention map's pyramidal TIFF."""
    return f"attention_{subspace}_{magnification}.tif"


def encode_map(raw: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(uint8 codes, lo, hi) of a float grid with NaN where there is no patch."""
    finite = np.isfinite(raw)
    if not finite.any():
        return np.zeros(raw.shape, np.uint8), 0.0, 0.0
    lo, hi = float(raw[finite].min()), float(raw[finite].max())
    span = hi - lo if hi > lo else 1.0
    codes = np.zeros(raw.shape, np.uint8)
    codes[finite] = 1 + np.round(254 * (raw[finite] - lo) / span).astype(np.uint8)
    return codes, lo, hi


def decode(codes: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Attention from the TIFF's codes (NaN where 0), the inverse of :func:`encode_map`."""
    codes = np.asarray(codes, dtype=np.float64)
    span = hi - lo if hi > lo else 1.0
    return np.where(codes > 0, lo + (codes - 1) / 254 * span, np.nan)


def level_sizes(width: int, height: int, tile: int = TILE) -> list[tuple[int, int, int]]:
    """(downsample, width, height) of each level: halving until one tile holds the level."""
    out = [(1, width, height)]
    while max(out[-1][1], out[-1][2]) > tile:
        d = out[-1][0] * 2
        out.append((d, math.ceil(width / d), math.ceil(height / d)))
    return out


def _cell_index(n: int, downsample: int, origin: int, step: int, cells: int, extent: int) -> np.ndarray:
    """Per level pixel along one axis, 1 + the grid cell its centre falls in: 0 before the
    grid, ``cells + 1`` after it (non-decreasing). A centre past the slide's last level-0
    pixel (odd sizes) takes that pixel's cell."""
    level0 = np.minimum(np.floor((np.arange(n) + 0.5) * downsample).astype(np.int64), extent - 1)
    return np.clip((level0 - origin) // step + 1, 0, cells + 1)


def _tiles(codes: np.ndarray, grid: Grid, downsample: int, width: int, height: int, tile: int,
           level0_size: tuple[int, int]) -> Iterator[bytes]:
    """The level's tiles, row by row, PackBits-encoded. A tile inside one value (background,
    or within a cell) is encoded once per value; the others are gathered from a band of
    rows of the cell grid, widened by repeating cells (a 2-D fancy index is ~15x slower).
    A last tile column narrower than ``tile`` is padded by the last cell (tifffile crops)."""
    from imagecodecs import packbits_encode

    rows, cols = grid.shape
    padded = np.zeros((rows + 2, cols + 2), np.uint8)  # a border of "no patch" all round
    padded[1:-1, 1:-1] = codes
    ny, nx = math.ceil(height / tile), math.ceil(width / tile)
    ri = _cell_index(ny * tile, downsample, grid.origin[1], grid.step[1], rows, level0_size[1])
    ci = _cell_index(nx * tile, downsample, grid.origin[0], grid.step[0], cols, level0_size[0])
    # each tile column: its cells and how many pixels each spans (ci is non-decreasing)
    col_runs = [np.unique(ci[tx * tile:(tx + 1) * tile], return_counts=True) for tx in range(nx)]
    constant: dict[int, bytes] = {}
    for ty in range(ny):
        r = ri[ty * tile:(ty + 1) * tile]
        band = padded[r]
        row_cells = padded[np.unique(r)]
        for cells_x, widths in col_runs:
            cells = row_cells.take(cells_x, axis=1)
            value = int(cells.flat[0])
            if (cells == value).all():
                if value not in constant:
                    constant[value] = packbits_encode(np.full((tile, tile), value, np.uint8))
                yield constant[value]
            else:
                yield packbits_encode(np.repeat(band.take(cells_x, axis=1), widths, axis=1))


def write_overlay_tiff(path: str | os.PathLike, *, raw: np.ndarray, grid: Grid, level0_size: tuple[int, int],
                       mpp: float | None, description: dict, tile: int = TILE) -> Path:
    """Write one map (``raw`` on ``grid``) as a pyramidal TIFF of ``level0_size`` (w, h)."""
    import tifffile

    codes, lo, hi = encode_map(raw)
    doc = {**description, "lo": lo, "hi": hi, "no_patch": 0,
           "decode": "attention = lo + (v - 1) / 254 * (hi - lo) for v >= 1"}
    width, height = (int(v) for v in level0_size)
    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**31) as tif:
        for i, (d, w, h) in enumerate(level_sizes(width, height, tile)):
            kwargs = {}
            if mpp:
                per_cm = 1e4 / (mpp * d)
                kwargs = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(
                _tiles(codes, grid, d, w, h, tile, (width, height)), shape=(h, w), dtype=np.uint8, tile=(tile, tile),
                photometric="minisblack", compression="packbits", subfiletype=0 if i == 0 else 1,
                description=json.dumps(doc) if i == 0 else None, metadata=None, **kwargs,
            )
    return path


def write_prediction_overlays(prediction, directory: str | os.PathLike) -> list[str]:
    """The finest magnification's tumor and TME maps as TIFFs in ``directory``; their names.

    Nothing is written without the slide's level-0 size (a prediction from feature files
    that do not record it): the overlay could not be aligned."""
    if prediction.level0_size is None or prediction.patches.empty:
        return []
    mag = magnifications_of(prediction.patches)[-1]
    rows = prediction.patches[prediction.patches["magnification"] == mag]
    grid = grid_for(rows)
    names = []
    for subspace, column in MAPS.items():
        name = overlay_name(subspace, mag)
        raw = mean_grid(rows, rows[column].to_numpy(), grid)
        write_overlay_tiff(
            Path(directory) / name, raw=raw, grid=grid, level0_size=prediction.level0_size, mpp=prediction.mpp,
            description={"dismm": "attention", "subspace": subspace, "magnification": mag,
                         "slide_id": prediction.slide_id, "model_id": prediction.model_id},
        )
        names.append(name)
    return names
