"""One pyramid level as a lazy, read-only numpy-like array.

Why not zarr: importing zarr 3 (with numcodecs and its async machinery) took ~0.15 s of
`dismm view`'s start, the largest share of what it paid beyond napari's own first frame,
and a zarr read goes through an event loop for what is a plain tile paste. napari needs
only ``shape``, ``dtype``, ``ndim``, ``size`` and numpy indexing (its layer-data protocol)
plus ``np.asarray`` for the thumbnail level; that is all this class provides. The zarr-3
view of the same tiles remains (`Slide.zarr_pyramid`) for tools that want a store.
"""

from __future__ import annotations

import operator

import numpy as np

from .tiles import SlideTiles


def _axis(key, n: int) -> tuple[int, int, int | slice]:
    """(start, stop, index within the read block) for an integer or slice on an axis of n."""
    if isinstance(key, slice):
        picked = range(*key.indices(n))
        if len(picked) == 0:
            return 0, 0, slice(None)
        lo, hi = min(picked[0], picked[-1]), max(picked[0], picked[-1]) + 1
        return lo, hi, slice(None, None, picked.step)  # a negative step starts at hi - 1 = picked[0]
    try:
        i = operator.index(key)
    except TypeError:
        raise TypeError(f"slide levels take integers and slices on y and x, not {type(key).__name__}") from None
    if not -n <= i < n:
        raise IndexError(f"index {i} is out of bounds for an axis of size {n}")
    i %= n
    return i, i + 1, 0


class LevelArray:
    """Level ``level`` of a slide: (height, width, 3) uint8, read on indexing."""

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, tiles: SlideTiles, level: int):
        self._tiles = tiles
        self.level = level
        g = tiles.levels[level]
        self.shape = (g.height, g.width, 3)
        cw, ch = tiles.chunk_sizes[level]
        self.chunks = (ch, cw, 3)  # a good read unit (what the zarr view serves)

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1] * 3

    @property
    def nbytes(self) -> int:
        return self.size

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LevelArray(level={self.level}, shape={self.shape}, dtype=uint8)"

    def __getitem__(self, key) -> np.ndarray:
        keys = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in keys):
            at = next(i for i, k in enumerate(keys) if k is Ellipsis)
            keys = keys[:at] + (slice(None),) * (3 - len(keys) + 1) + keys[at + 1 :]
        if len(keys) > 3:
            raise IndexError(f"too many indices for a slide level: {len(keys)} given, 3 axes")
        keys = keys + (slice(None),) * (3 - len(keys))
        y0, y1, yi = _axis(keys[0], self.shape[0])
        x0, x1, xi = _axis(keys[1], self.shape[1])
        block = self._tiles.read(self.level, y0, y1, x0, x1)
        return block[yi, xi, keys[2]]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:, :]
        return whole if dtype is None else whole.astype(dtype, copy=False)
