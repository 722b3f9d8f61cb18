"""Regions of a slide level assembled from the file's native tiles (numpy only, no zarr).

Every pixel read (napari's views, patch reads, thumbnails, the zarr store) comes through
`SlideTiles.read`: it decodes only the native tiles a region covers, several at a time on
a small thread pool (the codecs and OpenSlide release the GIL), and pastes them over the
slide's background. Pixels outside the image and tiles that cannot be decoded are
background; the first bad tile of a slide raises one `DismmWarning`.

The chunk grid (512–1024 px, an integer multiple of the native tile) is what the zarr view
(`store`) serves and what `LevelArray.chunks` advertises as a good read unit.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..errors import DismmWarning
from .sources import LevelGeometry

CHUNK_MIN, CHUNK_MAX = 512, 1024
_CACHE_BYTES = 64 * 2**20
#: a level up to this size can be kept whole in memory (`SlideTiles.keep_whole`)
KEEP_WHOLE_BYTES = 64 * 2**20
#: a region covering at least this many native tiles is decoded on the thread pool
_PARALLEL_FROM = 4

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _decode_pool() -> ThreadPoolExecutor:
    """One pool for every slide of the process, created on the first large read."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2),
                                       thread_name_prefix="dismm-tiles")
        return _pool


def _forget_pool_in_child() -> None:
    """A forked child has none of the parent's pool threads: it makes its own on first use."""
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def chunk_extent(native: int, image: int) -> int:
    """Smallest multiple of the native tile that is >= 512 (never above 1024 when native
    tiles are smaller than 512); a native tile already >= 512 is kept as is; strips
    (native = full image width) are cut into 1024-px chunks."""
    if native >= image and image > CHUNK_MAX:
        return CHUNK_MAX
    if native >= CHUNK_MIN:
        return native
    return native * -(-CHUNK_MIN // native)


class _TileCache:
    """Small LRU for tiles larger than a chunk (strips, 2048-px tiles): decoded once,
    reused by the neighbouring reads."""

    def __init__(self, budget: int = _CACHE_BYTES):
        self._items: OrderedDict[tuple[int, int, int], np.ndarray | None] = OrderedDict()
        self._bytes = 0
        self._budget = budget
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return True, self._items[key]
        return False, None

    def put(self, key, value: np.ndarray | None) -> None:
        size = 0 if value is None else value.nbytes
        with self._lock:
            self._items[key] = value
            self._bytes += size
            while self._bytes > self._budget and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= 0 if old is None else old.nbytes


class SlideTiles:
    """The pixel reader of one open slide, over a pixel source (see `sources`)."""

    def __init__(self, source, *, background: tuple[int, int, int], name: str):
        self._source = source
        self.background = np.asarray(background, dtype=np.uint8)
        self._name = name
        self.levels: list[LevelGeometry] = list(source.levels)
        self.chunk_sizes: list[tuple[int, int]] = [
            (chunk_extent(g.tile_width, g.width), chunk_extent(g.tile_height, g.height)) for g in self.levels
        ]
        self._cache = _TileCache()
        self._warned = False
        self._warn_lock = threading.Lock()
        self.bad_tiles: list[tuple[int, int, int]] = []
        self.tiles_read = 0  # native tiles decoded (or tried), bad ones included
        self._whole: dict[int, Future] = {}  # level -> its pixels, decoded once (keep_whole)
        self._pid = os.getpid()

    def keep_whole(self, level: int) -> bool:
        """Decode ``level`` once, on a background thread, and serve every later read of it
        from memory. Why: napari reads the overview level twice before its first frame (the
        layer thumbnail and, for a single-level slide, the view itself); started before the
        viewer is built, the decode overlaps napari's own start. Only levels of at most
        `KEEP_WHOLE_BYTES`; returns whether the level is (being) kept."""
        g = self.levels[level]
        if g.width * g.height * 3 > KEEP_WHOLE_BYTES:
            return False
        if level not in self._whole:
            self._pid = os.getpid()
            # its own thread, not the decode pool: the read below waits on pool work itself
            kept: Future = Future()
            self._whole[level] = kept

            def decode() -> None:
                try:
                    kept.set_result(self._read_tiles(level, 0, g.height, 0, g.width))
                except BaseException as exc:  # noqa: BLE001 - handed to the reader, raised there
                    kept.set_exception(exc)

            threading.Thread(target=decode, name="dismm-keep-level", daemon=True).start()
        return True

    def _tile(self, level: int, tx: int, ty: int, *, cache: bool) -> np.ndarray | None:
        key = (level, tx, ty)
        if cache:
            hit, value = self._cache.get(key)
            if hit:
                return value
        self.tiles_read += 1  # a racy += only undercounts a progress figure, never a result
        try:
            value = self._source.read_tile(level, tx, ty)
        except Exception as exc:  # noqa: BLE001 - codecs raise many types; napari must survive
            self._report_bad_tile(level, tx, ty, exc)
            value = None
        if cache:
            self._cache.put(key, value)
        return value

    def _report_bad_tile(self, level: int, tx: int, ty: int, exc: Exception) -> None:
        with self._warn_lock:
            self.bad_tiles.append((level, tx, ty))
            if self._warned:
                return
            self._warned = True
        warnings.warn(
            f"{self._name}: unreadable tile at level {level}, tile column {tx}, row {ty} "
            f"({type(exc).__name__}: {exc}); shown as background (further bad tiles not reported)",
            DismmWarning,
            stacklevel=2,
        )

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """(y1 - y0, x1 - x0, 3) uint8 of level pixels [y0, y1) x [x0, x1); any part outside
        the image is background."""
        kept = self._whole.get(level)
        if kept is None or (not kept.done() and os.getpid() != self._pid):  # a forked child lacks the thread
            return self._read_tiles(level, y0, y1, x0, x1)
        whole = kept.result()
        g = self.levels[level]
        if 0 <= y0 <= y1 <= g.height and 0 <= x0 <= x1 <= g.width:
            return whole[y0:y1, x0:x1].copy()  # inside the image: one copy, no background fill
        out = np.empty((max(0, y1 - y0), max(0, x1 - x0), 3), dtype=np.uint8)
        out[:] = self.background
        ys, ye, xs, xe = max(y0, 0), min(y1, g.height), max(x0, 0), min(x1, g.width)
        if ye > ys and xe > xs:
            out[ys - y0 : ye - y0, xs - x0 : xe - x0] = whole[ys:ye, xs:xe]
        return out

    def _read_tiles(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        g = self.levels[level]
        out = np.empty((max(0, y1 - y0), max(0, x1 - x0), 3), dtype=np.uint8)
        out[:] = self.background
        ys, ye, xs, xe = max(y0, 0), min(y1, g.height), max(x0, 0), min(x1, g.width)
        if ye <= ys or xe <= xs:
            return out
        th, tw = g.tile_height, g.tile_width
        cw, ch = self.chunk_sizes[level]
        cache = tw > cw or th > ch

        def paste(tx: int, ty: int) -> None:
            tile = self._tile(level, tx, ty, cache=cache)
            if tile is None:
                return
            oy, ox = ty * th, tx * tw
            ty0, ty1 = max(ys, oy), min(ye, oy + tile.shape[0])
            tx0, tx1 = max(xs, ox), min(xe, ox + tile.shape[1])
            if ty1 > ty0 and tx1 > tx0:
                out[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0] = tile[ty0 - oy : ty1 - oy, tx0 - ox : tx1 - ox]

        cols = range(xs // tw, (xe - 1) // tw + 1)
        rows = range(ys // th, (ye - 1) // th + 1)
        if len(cols) * len(rows) < _PARALLEL_FROM:
            for ty in rows:
                for tx in cols:
                    paste(tx, ty)
        else:
            futures = [_decode_pool().submit(paste, tx, ty) for ty in rows for tx in cols]
            for future in futures:
                future.result()  # re-raises here (e.g. a warning turned into an error)
        return out

    def chunk_array(self, level: int, cy: int, cx: int) -> np.ndarray:
        """Chunk (cy, cx) of a level as a full (ch, cw, 3) array (background past the edge)."""
        cw, ch = self.chunk_sizes[level]
        return self.read(level, cy * ch, (cy + 1) * ch, cx * cw, (cx + 1) * cw)
