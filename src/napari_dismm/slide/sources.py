"""Pixel backends. Each exposes its levels' native tile grid and decodes one native tile
to RGB (alpha already composited). The zarr store regroups tiles into chunks.

- `TiffSource` reads every level from the file's own tiles (or strips) with tifffile, so
  reduced levels show the pixels the file stores — no resampling, no drift.
- `OpenSlideSource` is for formats tifffile cannot decode (MIRAX, VMS/VMU, NDPI, SCN, BIF,
  ...). It reads with ``read_region`` at level-0 coordinates ``tile * round(downsample)``;
  levels whose downsample is not within 2 % of an integer are dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SlideError
from .pixels import ALPHA_ASSOCIATED, ALPHA_NONE, ALPHA_UNASSOCIATED, composite, to_rgb

#: Largest single decoded strip/tile we accept (a stripped TIFF stored as one huge strip
#: would need the whole image in memory for any read).
MAX_SEGMENT_BYTES = 64 * 2**20
#: Raw bytes of the smallest level hashed for the content id (files OpenSlide cannot open).
HASH_BYTES_CAP = 64 * 2**20
#: Bounds of a plausible slide, checked on the header before any pixel is read: the largest
#: glass slide (75 x 50 mm) at 0.1 µm/px is 750 000 px; a header beyond these is corrupt or
#: forged, and serving it would mean minutes of reading background.
MAX_SIDE_PX = 1_000_000
MAX_LEVELS = 40
MAX_TILES_PER_LEVEL = 2**24


def check_level_count(count: int, *, name: str) -> None:
    if count > MAX_LEVELS:
        raise SlideError(f"{name}: the header declares {count} pyramid levels (at most {MAX_LEVELS} "
                         "are plausible); the file is corrupt")


def check_plausible(levels: list[LevelGeometry], *, name: str) -> None:
    """SlideError (one line) for a declared size, level count or tile count no slide has."""
    check_level_count(len(levels), name=name)
    for i, g in enumerate(levels):
        if g.width < 1 or g.height < 1 or max(g.width, g.height) > MAX_SIDE_PX:
            raise SlideError(f"{name}: the header declares level {i} as {g.width} x {g.height} px "
                             f"(plausible: 1 to {MAX_SIDE_PX} px a side); the file is corrupt")
        tiles = -(-g.width // max(1, g.tile_width)) * -(-g.height // max(1, g.tile_height))
        if g.tile_width < 1 or g.tile_height < 1 or tiles > MAX_TILES_PER_LEVEL:
            raise SlideError(f"{name}: the header declares {tiles} tiles of {g.tile_width} x {g.tile_height} px "
                             f"at level {i} (at most {MAX_TILES_PER_LEVEL} are plausible); the file is corrupt")


@contextlib.contextmanager
def _quiet_tifffile():
    """tifffile logs parse problems itself; we turn them into one SlideError instead."""
    logger = logging.getLogger("tifffile")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


class UnsupportedLayout(Exception):
    """Internal: tifffile could parse the file but we cannot serve it; try OpenSlide."""


@dataclass(frozen=True)
class LevelGeometry:
    width: int
    height: int
    tile_width: int  # native segment width (image width for strips)
    tile_height: int


class _Pread:
    """Positional reads from one descriptor: thread-safe without a lock on POSIX."""

    def __init__(self, path: Path):
        self._fh = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self.size = os.fstat(self._fh.fileno()).st_size

    def read(self, offset: int, count: int) -> bytes:
        if hasattr(os, "pread"):
            return os.pread(self._fh.fileno(), count, offset)
        with self._lock:
            self._fh.seek(offset)
            return self._fh.read(count)

    def close(self) -> None:
        self._fh.close()


class _TiffLevel:
    def __init__(self, page, frame, background: tuple[int, int, int]):
        import tifffile

        self.page = page
        self.offsets = np.asarray(frame.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(frame.databytecounts, dtype=np.int64)
        height, width = int(page.imagelength), int(page.imagewidth)
        spp = int(page.samplesperpixel)
        if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and spp > 1:
            raise UnsupportedLayout("planar (separate-plane) TIFF")
        if page.dtype is None or np.dtype(page.dtype) not in (np.uint8, np.uint16, np.bool_):
            raise UnsupportedLayout(f"sample type {page.dtype}")
        if int(page.compression) not in tifffile.TIFF.DECOMPRESSORS:
            raise UnsupportedLayout(f"compression {page.compression!s}")
        if page.is_tiled:
            tw, th = int(page.tilewidth), int(page.tilelength)
        else:
            tw, th = width, min(int(page.rowsperstrip or height), height)
            if tw * th * spp * np.dtype(page.dtype).itemsize > MAX_SEGMENT_BYTES:
                raise SlideError(
                    f"stripped (untiled) TIFF with {tw * th * spp // 2**20} MB strips cannot be read "
                    "lazily; convert it to a tiled pyramid (e.g. `vips tiffsave in out.tif --tile --pyramid`)"
                )
        self.geometry = LevelGeometry(width, height, tw, th)
        check_plausible([self.geometry], name=Path(page.parent.filehandle.path).name)
        self.n_across = -(-width // tw)
        declared = self.n_across * -(-height // th)
        if len(self.offsets) < declared or len(self.counts) < declared:
            raise SlideError(
                f"{Path(page.parent.filehandle.path).name}: the header declares {width} x {height} px in "
                f"{declared} tiles but stores {len(self.offsets)} tile offsets; the file is corrupt"
            )
        extras = tuple(int(e) for e in (page.extrasamples or ()))
        alpha = ALPHA_NONE
        if extras and extras[0] in (ALPHA_ASSOCIATED, ALPHA_UNASSOCIATED):
            alpha = extras[0]
        photometric = int(page.photometric)
        self._convert = dict(
            background=background,
            alpha=alpha,
            invert=photometric == int(tifffile.PHOTOMETRIC.MINISWHITE),
            colormap=page.colormap if photometric == int(tifffile.PHOTOMETRIC.PALETTE) else None,
        )
        self._decode = page.decode
        self._jpeg = dict(jpegtables=page.jpegtables, jpegheader=page.jpegheader)

    def segment_index(self, tx: int, ty: int) -> int:
        return ty * self.n_across + tx

    def decode(self, data: bytes, index: int) -> np.ndarray:
        seg, _, _ = self._decode(data, index, **self._jpeg)
        if seg is None:
            raise ValueError("decoder returned no data")
        seg = seg.reshape(seg.shape[-3], seg.shape[-2], seg.shape[-1])
        return to_rgb(seg, **self._convert)


class TiffSource:
    backend = "tifffile"

    def __init__(self, path: Path, *, background: tuple[int, int, int]):
        import tifffile

        with _quiet_tifffile():
            self._tif = tifffile.TiffFile(path)
        try:
            with _quiet_tifffile():
                self._levels = self._open_levels(background)
            self._io = _Pread(path)
            self._check_truncation()
            self._probe_decoder()
        except BaseException:
            self._tif.close()
            raise

    def _open_levels(self, background) -> list[_TiffLevel]:
        if not self._tif.series:
            raise UnsupportedLayout("no image series")
        series = self._tif.series[0]
        levels = []
        check_level_count(len(series.levels), name=Path(self._tif.filehandle.path).name)
        for level in series.levels:
            axes = level.axes.replace("Q", "")
            if axes not in ("YX", "YXS"):
                raise UnsupportedLayout(f"image axes {level.axes} (need a 2-D grey or RGB(A) image)")
            frame = level.pages[0] if level.pages else None
            if frame is None:
                raise UnsupportedLayout("level without pages")
            levels.append(_TiffLevel(level.keyframe, frame, background))
        if not levels:
            raise UnsupportedLayout("no levels")
        check_plausible([lv.geometry for lv in levels], name=Path(self._tif.filehandle.path).name)
        return levels

    def _check_truncation(self) -> None:
        for i, lv in enumerate(self._levels):
            ends = lv.offsets + lv.counts
            if len(ends) and int(ends.max()) > self._io.size:
                raise SlideError(
                    f"truncated slide: level {i} data extends to byte {int(ends.max())} "
                    f"but the file has {self._io.size} bytes"
                )

    def _probe_decoder(self) -> None:
        """Decode the first stored tile of the smallest level, so a codec or colour layout
        we cannot handle sends the file to OpenSlide instead of showing only background."""
        lv = self._levels[-1]
        stored = np.flatnonzero(lv.counts)
        if len(stored) == 0:
            return
        index = int(stored[0])
        try:
            lv.decode(self._io.read(int(lv.offsets[index]), int(lv.counts[index])), index)
        except Exception as exc:  # noqa: BLE001 - any codec failure means "not servable here"
            raise UnsupportedLayout(f"cannot decode tiles ({type(exc).__name__}: {exc})") from None

    @property
    def levels(self) -> list[LevelGeometry]:
        return [lv.geometry for lv in self._levels]

    @property
    def tif(self):
        return self._tif

    def read_tile(self, level: int, tx: int, ty: int) -> np.ndarray | None:
        """RGB of one native tile (padded to the tile size at edges); None = no data stored."""
        lv = self._levels[level]
        index = lv.segment_index(tx, ty)
        count = int(lv.counts[index])
        if count == 0:
            return None
        data = self._io.read(int(lv.offsets[index]), count)
        if len(data) != count:
            raise OSError(f"short read ({len(data)} of {count} bytes)")
        return lv.decode(data, index)

    def content_hash(self) -> str:
        """sha256 over all level dimensions + raw bytes of the smallest level (capped)."""
        h = hashlib.sha256()
        for g in self.levels:
            h.update(f"{g.width}x{g.height};".encode())
        lv = self._levels[-1]
        budget = HASH_BYTES_CAP
        for off, cnt in zip(lv.offsets.tolist(), lv.counts.tolist(), strict=True):
            cnt = min(cnt, budget)
            if cnt <= 0:
                continue
            h.update(self._io.read(off, cnt))
            budget -= cnt
            if budget <= 0:
                break
        return h.hexdigest()

    def close(self) -> None:
        self._tif.close()
        self._io.close()


class OpenSlideSource:
    backend = "openslide"

    def __init__(self, osr, *, background: tuple[int, int, int]):
        self._osr = osr
        self._background = background
        self._levels: list[LevelGeometry] = []
        self._index: list[int] = []  # our level -> OpenSlide level
        self._factor: list[int] = []
        props = osr.properties
        for i, ((w, h), ds) in enumerate(zip(osr.level_dimensions, osr.level_downsamples, strict=True)):
            factor = max(1, round(ds))
            if i and abs(ds - factor) / ds > 0.02:
                continue
            tw = int(props.get(f"openslide.level[{i}].tile-width", 256) or 256)
            th = int(props.get(f"openslide.level[{i}].tile-height", 256) or 256)
            self._levels.append(LevelGeometry(int(w), int(h), tw, th))
            self._index.append(i)
            self._factor.append(factor)

    @property
    def levels(self) -> list[LevelGeometry]:
        return self._levels

    @property
    def downsamples(self) -> list[float]:
        return [float(self._osr.level_downsamples[i]) for i in self._index]

    def read_tile(self, level: int, tx: int, ty: int) -> np.ndarray | None:
        g = self._levels[level]
        x, y = tx * g.tile_width, ty * g.tile_height
        w, h = min(g.tile_width, g.width - x), min(g.tile_height, g.height - y)
        f = self._factor[level]
        rgba = np.asarray(self._osr.read_region((x * f, y * f), self._index[level], (w, h)))
        return composite(rgba[..., :3], rgba[..., 3], self._background, premultiplied=False)

    def close(self) -> None:
        self._osr.close()
