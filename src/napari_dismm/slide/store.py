"""A read-only zarr 3 store serving a slide pyramid chunk by chunk (`Slide.zarr_pyramid`).

For tools that want zarr; napari and the package itself read through `levels.LevelArray`
(the same pixels, without importing zarr). Layout: a group at the root, one array per level
named ``"0"``, ``"1"``, ... with shape (H, W, 3) uint8 and the plain ``bytes`` codec: a
chunk is assembled on request from the native tiles it covers (`tiles.SlideTiles`; chunks
are an integer multiple of the native tile, 512–1024 px). Pixels outside the image and
tiles that cannot be decoded are background.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

from .tiles import SlideTiles


class SlideStore(Store):
    """zarr 3 Store over a slide's tiles."""

    supports_writes = False
    supports_deletes = False
    supports_partial_writes = False
    supports_listing = True

    def __init__(self, tiles: SlideTiles):
        super().__init__(read_only=True)
        self._tiles = tiles
        self._levels = tiles.levels
        self._chunks = tiles.chunk_sizes
        background = tiles.background
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

    # -- Store API ----------------------------------------------------------------------
    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        if key in self._meta:
            data = self._meta[key]
        else:
            parsed = self._parse_chunk_key(key)
            if parsed is None:
                return None
            chunk = await asyncio.to_thread(self._tiles.chunk_array, *parsed)
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
