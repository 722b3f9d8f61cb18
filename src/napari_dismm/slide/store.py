"""A read-only zarr 3 store that serves a slide pyramid chunk by chunk.

Layout: a group at the root, one array per level named ``"0"``, ``"1"``, ... with shape
(H, W, 3) uint8 and the plain ``bytes`` codec: a chunk is assembled on request from the
native tiles it covers (chunks are an integer multiple of the native tile, 512–1024 px),
so nothing is decoded until napari asks for it. Pixels outside the image and tiles that
cannot be decoded are background; the first bad tile of a slide raises one `DismmWarning`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import warnings
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable

import numpy as np
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

from ..errors import DismmWarning
from .sources import LevelGeometry

CHUNK_MIN, CHUNK_MAX = 512, 1024
_CACHE_BYTES = 64 * 2**20


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
    reused by the neighbouring chunks."""

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


class SlideStore(Store):
    """zarr 3 Store over a pixel source (see `sources`)."""

    supports_writes = False
    supports_deletes = False
    supports_partial_writes = False
    supports_listing = True

    def __init__(self, source, *, background: tuple[int, int, int], name: str):
        super().__init__(read_only=True)
        self._source = source
        self._background = np.asarray(background, dtype=np.uint8)
        self._name = name
        self._levels: list[LevelGeometry] = list(source.levels)
        self._chunks = [
            (chunk_extent(g.tile_width, g.width), chunk_extent(g.tile_height, g.height)) for g in self._levels
        ]
        self._cache = _TileCache()
        self._warned = False
        self._warn_lock = threading.Lock()
        self.bad_tiles: list[tuple[int, int, int]] = []
        self.tiles_read = 0  # native tiles decoded (or tried), bad ones included
        self._meta = {"zarr.json": self._json({"zarr_format": 3, "node_type": "group", "attributes": {}})}
        for level, (g, (cw, ch)) in enumerate(zip(self._levels, self._chunks, strict=True)):
            self._meta[f"{level}/zarr.json"] = self._json(
                {
                    "zarr_format": 3,
                    "node_type": "array",
                    "shape": [g.height, g.width, 3],
                    "data_type": "uint8",
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [ch, cw, 3]}},
                    "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
                    "fill_value": int(background[0]),
                    "codecs": [{"name": "bytes"}],
                    "attributes": {"level": level},
                    "dimension_names": ["y", "x", "c"],
                }
            )

    @staticmethod
    def _json(obj) -> bytes:
        return json.dumps(obj).encode()

    @property
    def chunk_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of the chunks of every level."""
        return list(self._chunks)

    def __eq__(self, other: object) -> bool:
        return other is self

    __hash__ = object.__hash__

    # -- chunk assembly -----------------------------------------------------------------
    def _parse_chunk_key(self, key: str) -> tuple[int, int, int] | None:
        parts = key.split("/")
        if len(parts) != 5 or parts[1] != "c" or parts[4] != "0":
            return None
        try:
            level, cy, cx = int(parts[0]), int(parts[2]), int(parts[3])
        except ValueError:
            return None
        if not 0 <= level < len(self._levels):
            return None
        g, (cw, ch) = self._levels[level], self._chunks[level]
        if not (0 <= cy * ch < g.height and 0 <= cx * cw < g.width):
            return None
        return level, cy, cx

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

    def chunk_array(self, level: int, cy: int, cx: int) -> np.ndarray:
        """Assemble chunk (cy, cx) of a level as a full (ch, cw, 3) array."""
        g, (cw, ch) = self._levels[level], self._chunks[level]
        out = np.empty((ch, cw, 3), dtype=np.uint8)
        out[:] = self._background
        y0, x0 = cy * ch, cx * cw
        y1, x1 = min(y0 + ch, g.height), min(x0 + cw, g.width)
        th, tw = g.tile_height, g.tile_width
        cache = tw > cw or th > ch
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._tile(level, tx, ty, cache=cache)
                if tile is None:
                    continue
                oy, ox = ty * th, tx * tw
                ys, ye = max(y0, oy), min(y1, oy + tile.shape[0])
                xs, xe = max(x0, ox), min(x1, ox + tile.shape[1])
                if ye > ys and xe > xs:
                    out[ys - y0 : ye - y0, xs - x0 : xe - x0] = tile[ys - oy : ye - oy, xs - ox : xe - ox]
        return out

    # -- Store API ----------------------------------------------------------------------
    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        if key in self._meta:
            data = self._meta[key]
        else:
            parsed = self._parse_chunk_key(key)
            if parsed is None:
                return None
            chunk = await asyncio.to_thread(self.chunk_array, *parsed)
            data = chunk.tobytes()
        return prototype.buffer.from_bytes(_slice(data, byte_range))

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def exists(self, key: str) -> bool:
        return key in self._meta or self._parse_chunk_key(key) is not None

    async def set(self, key: str, value: Buffer) -> None:
        raise PermissionError("slide stores are read-only")

    async def delete(self, key: str) -> None:
        raise PermissionError("slide stores are read-only")

    async def list(self) -> AsyncIterator[str]:
        for key in self._meta:
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in self._meta:
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        prefix = prefix.rstrip("/")
        if prefix == "":
            yield "zarr.json"
            for level in range(len(self._levels)):
                yield str(level)
        elif prefix.isdigit() and int(prefix) < len(self._levels):
            yield "zarr.json"

    def close(self) -> None:
        super().close()


def _slice(data: bytes, byte_range: ByteRequest | None) -> bytes:
    match byte_range:
        case None:
            return data
        case RangeByteRequest(start=start, end=end):
            return data[start:end]
        case OffsetByteRequest(offset=offset):
            return data[offset:]
        case SuffixByteRequest(suffix=suffix):
            return data[-suffix:] if suffix else b""
    raise TypeError(f"unsupported byte range {byte_range!r}")
