"""Patch grids at a target magnification, and reading those patches from the best level.

Geometry (why it is done this way):
- The grid lives in level-0 pixels. A patch of ``patch_size`` px at ``target_mpp`` spans
  ``patch_size_level0 = round(patch_size * target_mpp / mpp0)`` level-0 px, and the grid
  step is that same integer (minus the overlap), so patch k starts at exactly
  ``k * step_level0``: rounding happens once, patches never drift along a row.
- Only patches lying fully inside level 0 are produced (a border strip narrower than one
  patch is not covered), and a patch is kept when its tissue fraction >= ``min_tissue``.
- Patches are read from the finest-needed pyramid level: the coarsest level whose
  downsample is <= target_mpp / mpp0 (1 % tolerance, so levels with downsample 4.0008
  from odd sizes still count as 4). Level 0 is never assumed to be 40x.
- Level-0 x maps to x / ds on a level, with ds the exact per-axis size ratio (4099 / 1024 =
  4.0029, not 4): close to how OpenSlide addresses levels (it averages the two axes) and
  exactly how our sample slides are rendered; for a pyramid made by an exact integer factor with floored sizes the two differ
  by less than one level pixel across the whole slide. The region read there is rounded to
  whole level pixels (<= 0.5 level px error) and then resized to ``patch_size`` by
  :func:`resize_patch` (PIL box filter = exact area average when shrinking, bilinear when
  enlarging).
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from napari_dismm.errors import DismmWarning, SlideError, UnknownMppError
from napari_dismm.tissue import TissueMask

#: relative tolerance when comparing a level's downsample (or the native mpp) with the target
LEVEL_TOLERANCE = 0.01

MAGNIFICATIONS: dict[str, float] = {"10x": 1.0, "20x": 0.5}
"""Magnification labels and their µm/px (the usual convention: 40x ~ 0.25, 20x ~ 0.5)."""


def magnification_to_mpp(magnification: str | int | float) -> float:
    """Parse "10x", "10", 10 or 10.0 (and "20x", "40X", ...) into µm/px as 10 / magnification."""
    text = str(magnification).strip().lower()
    if text in MAGNIFICATIONS:
        return MAGNIFICATIONS[text]
    try:
        value = float(text.removesuffix("x"))
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise SlideError(f"cannot read magnification {magnification!r}: expected e.g. 10, '10x', '20x'")
    return 10.0 / value


def magnification_label(mpp: float) -> str:
    """The label ("10x", "20x", ...) of a resolution, rounded to a whole magnification within 5 %."""
    if not math.isfinite(mpp) or mpp <= 0:
        raise SlideError(f"mpp must be a positive number, got {mpp!r}")
    mag = 10.0 / mpp
    whole = round(mag)
    if whole >= 1 and abs(mag - whole) <= 0.05 * mag:
        return f"{whole}x"
    return f"{mag:.3g}x"


@dataclass(frozen=True)
class PatchGrid:
    """Patches of one slide at one magnification, addressed by level-0 top-left corners."""

    coords: np.ndarray
    """(N, 2) int64 level-0 top-left (x, y), multiples of ``step_level0``."""
    tissue_fraction: np.ndarray
    """(N,) float32 tissue fraction of each patch's level-0 box."""
    patch_size: int
    """Patch side at the target magnification (what the encoder sees)."""
    patch_size_level0: int
    step_level0: int
    overlap: int
    target_mpp: float
    magnification: str
    mpp0: float
    level0_size: tuple[int, int]
    level: int
    """Pyramid level the patches are read from."""
    level_downsample: tuple[float, float]
    """(x, y) level-0 px per pixel of ``level``."""
    read_size: tuple[int, int]
    """(width, height) of the region read at ``level`` before resizing."""
    upsampled: bool
    """True when the slide is coarser than the target and patches are enlarged."""
    min_tissue: float
    slide_id: str | None = None

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def boxes_level0(self) -> np.ndarray:
        """(N, 4) level-0 boxes (x, y, width, height)."""
        size = np.full((len(self), 2), self.patch_size_level0, dtype=np.int64)
        return np.concatenate([self.coords, size], axis=1)

    def attrs(self) -> dict[str, Any]:
        """Attributes of the grid as TRIDENT and CLAM store them on ``coords``."""
        return {
            "patch_size": self.patch_size,
            "patch_size_level0": self.patch_size_level0,
            "level0_magnification": 10.0 / self.mpp0,
            "target_magnification": 10.0 / self.target_mpp,
            "overlap": self.overlap,
            "level0_width": self.level0_size[0],
            "level0_height": self.level0_size[1],
            "patch_level": self.level,
            "downsample": list(self.level_downsample),
            "mpp": self.mpp0,
            "target_mpp": self.target_mpp,
            "min_tissue": self.min_tissue,
        }


def level_downsample(level_dimensions: Sequence[Sequence[int]], level: int) -> tuple[float, float]:
    """Level-0 px per pixel of ``level`` in (x, y): the exact per-axis ratio of the sizes."""
    w0, h0 = level_dimensions[0]
    wl, hl = level_dimensions[level]
    return (w0 / wl, h0 / hl)


def best_read_level(level_dimensions: Sequence[Sequence[int]], target_downsample: float) -> int:
    """The coarsest level whose downsample does not exceed the target (within tolerance)."""
    best, best_ds = 0, 1.0
    for level in range(len(level_dimensions)):
        ds = max(level_downsample(level_dimensions, level))
        if ds <= target_downsample * (1 + LEVEL_TOLERANCE) and ds > best_ds:
            best, best_ds = level, ds
    return best


def make_grid(
    slide: Any,
    *,
    target_mpp: float,
    patch_size: int = 224,
    overlap: int = 0,
    tissue: TissueMask,
    min_tissue: float = 0.25,
) -> PatchGrid:
    """Grid of tissue patches of ``patch_size`` px at ``target_mpp`` (1.0 = 10x, 0.5 = 20x)."""
    info = slide.info
    name = getattr(info, "slide_id", None) or "<slide>"
    if not (isinstance(target_mpp, (int, float)) and math.isfinite(target_mpp) and target_mpp > 0):
        raise SlideError(f"target mpp must be a positive number, got {target_mpp!r}")
    if not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise SlideError(f"patch size must be a positive integer, got {patch_size!r}")
    if not isinstance(overlap, (int, np.integer)) or not 0 <= overlap < patch_size:
        raise SlideError(f"overlap must be an integer in [0, {patch_size}), got {overlap!r}")
    if not 0.0 <= min_tissue <= 1.0:
        raise SlideError(f"min_tissue must be in [0, 1], got {min_tissue!r}")
    mpp0 = info.mpp
    if mpp0 is None:
        raise UnknownMppError(
            f"{name}: microns per pixel unknown (no vendor or TIFF resolution metadata); "
            "pass --mpp with the scan resolution, e.g. --mpp 0.25 for 40x or 0.5 for 20x"
        )
    dims = [tuple(int(v) for v in d) for d in info.level_dimensions]
    w0, h0 = dims[0]
    if tuple(tissue.level0_size) != (w0, h0):
        raise SlideError(
            f"{name}: tissue mask was made for a {tissue.level0_size[0]} x "
            f"{tissue.level0_size[1]} slide, this one is {w0} x {h0}"
        )

    scale = target_mpp / mpp0  # level-0 px per target px
    patch0 = max(1, round(patch_size * scale))
    step0 = max(1, patch0 - round(overlap * scale))
    if patch0 > w0 or patch0 > h0:
        raise SlideError(
            f"{name}: slide of {w0} x {h0} px is smaller than one {patch_size} px patch at "
            f"{target_mpp:g} µm/px ({patch0} px at level 0)"
        )
    upsampled = mpp0 > target_mpp * (1 + LEVEL_TOLERANCE)
    if upsampled:
        warnings.warn(
            f"{name}: native resolution {mpp0:g} µm/px is coarser than the requested "
            f"{target_mpp:g} µm/px ({magnification_label(target_mpp)}); patches are upsampled "
            "and hold no more detail than the scan",
            DismmWarning,
            stacklevel=2,
        )
    level = best_read_level(dims, scale)
    dsx, dsy = level_downsample(dims, level)
    read_size = (max(1, round(patch0 / dsx)), max(1, round(patch0 / dsy)))

    xs = np.arange(0, w0 - patch0 + 1, step0, dtype=np.int64)
    ys = np.arange(0, h0 - patch0 + 1, step0, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)  # row-major: y outer, x inner
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    boxes = np.concatenate([coords, np.full_like(coords, patch0)], axis=1)
    fractions = tissue.fractions_in(boxes)
    keep = fractions >= min_tissue if not tissue.empty else np.zeros(len(coords), dtype=bool)
    return PatchGrid(
        coords=np.ascontiguousarray(coords[keep]),
        tissue_fraction=fractions[keep].astype(np.float32),
        patch_size=int(patch_size),
        patch_size_level0=int(patch0),
        step_level0=int(step0),
        overlap=int(overlap),
        target_mpp=float(target_mpp),
        magnification=magnification_label(target_mpp),
        mpp0=float(mpp0),
        level0_size=(w0, h0),
        level=level,
        level_downsample=(dsx, dsy),
        read_size=read_size,
        upsampled=upsampled,
        min_tissue=float(min_tissue),
        slide_id=getattr(info, "slide_id", None),
    )


def resize_patch(region: np.ndarray, *, size: int) -> np.ndarray:
    """Resize an (h, w, 3) uint8 region to (size, size, 3): box (area) filter when shrinking,
    bilinear when enlarging; an exact-size region is returned unchanged (as a copy)."""
    h, w = region.shape[:2]
    if (h, w) == (size, size):
        return np.array(region, dtype=np.uint8, copy=True)
    shrinking = h >= size and w >= size
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    image = Image.fromarray(np.ascontiguousarray(region, dtype=np.uint8))
    return np.asarray(image.resize((size, size), resample=method), dtype=np.uint8)


def read_region_of(slide: Any, grid: PatchGrid, index: int) -> np.ndarray:
    """The unresized region of patch ``index`` at the grid's read level."""
    x0, y0 = grid.coords[index]
    dsx, dsy = grid.level_downsample
    return slide.read_level(
        level=grid.level,
        x=int(round(x0 / dsx)),
        y=int(round(y0 / dsy)),
        width=grid.read_size[0],
        height=grid.read_size[1],
    )


def read_patches(slide: Any, grid: PatchGrid, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Patches ``indices`` of ``grid`` as an (n, patch_size, patch_size, 3) uint8 array.

    Neighbours on one grid row are read as one strip (up to ``MAX_STRIP_WIDTH`` level px),
    so a chunked or tiled backend decodes each tile once per strip rather than once per
    patch; the pixels are exactly those of per-patch reads.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= len(grid)):
        raise IndexError(f"patch indices must be in [0, {len(grid)}), got {idx.min()}..{idx.max()}")
    out = np.empty((idx.size, grid.patch_size, grid.patch_size, 3), dtype=np.uint8)
    if idx.size == 0:
        return out
    dsx, dsy = grid.level_downsample
    xl = np.rint(grid.coords[idx, 0] / dsx).astype(np.int64)
    yl = np.rint(grid.coords[idx, 1] / dsy).astype(np.int64)
    rw, rh = grid.read_size
    for run in _row_runs(xl, yl, read_width=rw):
        x_first = int(xl[run[0]])
        strip = slide.read_level(
            level=grid.level, x=x_first, y=int(yl[run[0]]), width=int(xl[run[-1]]) + rw - x_first, height=rh
        )
        for pos in run:
            offset = int(xl[pos]) - x_first
            out[pos] = resize_patch(strip[:, offset : offset + rw], size=grid.patch_size)
    return out


#: Widest strip (level px) read at once by :func:`read_patches`.
MAX_STRIP_WIDTH = 4096


def _row_runs(xl: np.ndarray, yl: np.ndarray, *, read_width: int) -> list[np.ndarray]:
    """Positions grouped into runs on one row whose regions touch or overlap (no gaps)."""
    order = np.lexsort((xl, yl))
    runs, start = [], 0
    for j in range(1, order.size + 1):
        if (
            j == order.size
            or yl[order[j]] != yl[order[start]]
            or xl[order[j]] - xl[order[j - 1]] > read_width
            or xl[order[j]] + read_width - xl[order[start]] > max(MAX_STRIP_WIDTH, read_width)
        ):
            runs.append(order[start:j])
            start = j
    return runs


def iter_patch_batches(
    slide: Any,
    grid: PatchGrid,
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    indices: Sequence[int] | np.ndarray | None = None,
    prefetch: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (indices, patches) batches in order while worker threads read the next ones.

    At most ``prefetch`` (default ``2 * num_workers``) batches are read ahead, so memory
    stays bounded; a reader's exception is raised here, and closing the iterator early
    cancels queued reads and waits only for the ones already running.
    ``num_workers=0`` reads in the caller's thread.
    """
    if batch_size < 1:
        raise SlideError(f"batch size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise SlideError(f"num_workers must be >= 0, got {num_workers}")
    idx = np.arange(len(grid)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    batches = (idx[i : i + batch_size] for i in range(0, idx.size, batch_size))
    if num_workers == 0:
        for batch in batches:
            yield batch, read_patches(slide, grid, batch)
        return
    depth = max(1, prefetch if prefetch is not None else 2 * num_workers)
    pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="dismm-read")
    pending: deque[tuple[np.ndarray, Future[np.ndarray]]] = deque()

    def submit_next() -> None:
        batch = next(batches, None)
        if batch is not None:
            pending.append((batch, pool.submit(read_patches, slide, grid, batch)))

    try:
        for _ in range(depth):
            submit_next()
        while pending:
            batch, future = pending.popleft()
            patches = future.result()
            submit_next()
            yield batch, patches
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
