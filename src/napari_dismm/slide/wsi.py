"""`open_slide`: pick a pixel backend, gather metadata, expose the lazy pyramid
(`levels.LevelArray` per level; `Slide.zarr_pyramid` for a zarr-3 view of the same tiles).

Backend choice: TIFF-family files whose layout tifffile can serve (Aperio SVS, generic
tiled/stripped TIFF, OME-TIFF, SubIFD pyramids) are read with tifffile from the file's own
tiles at every level; everything else OpenSlide opens (MIRAX, NDPI, SCN, BIF, VMS/VMU,
Sakura, Philips, ...) goes through OpenSlide. OpenSlide still supplies metadata (quickhash,
mpp, objective, background colour) whenever it can open the file.

Stripped (untiled) TIFFs are served lazily strip by strip; a file whose single strip would
decode to more than 64 MB is refused with a SlideError telling the user to convert it.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import SlideError, UnknownMppError
from .detect import has_tiff_magic
from .info import CONTENT_HASH_PREFIX, SlideInfo, check_user_mpp, parse_float, parse_hex_colour, resolve_mpp
from .sources import OpenSlideSource, TiffSource, UnsupportedLayout, check_level_count, check_plausible
from .levels import LevelArray
from .tiles import SlideTiles

# Vendors whose TIFF pages tifffile reads exactly like OpenSlide at level 0.
_TIFFFILE_VENDORS = {None, "aperio", "generic-tiff"}


class Slide:
    """An open slide: `info`, the lazy `pyramid` and region reads. Close it (or use `with`)."""

    def __init__(self, *, info: SlideInfo, source, tiles: SlideTiles):
        self.info = info
        self._source = source
        self._tiles = tiles
        #: one lazy read-only array per level (numpy indexing; `levels.LevelArray`)
        self.pyramid = [LevelArray(tiles, i) for i in range(info.level_count)]

    def zarr_pyramid(self) -> list:
        """The same levels as zarr-3 arrays over a read-only store (`store.SlideStore`), for
        tools that want zarr; imports zarr, which napari and the package do not need."""
        import zarr

        from .store import SlideStore

        store = SlideStore(self._tiles)
        return [zarr.open_array(store=store, path=str(i), mode="r") for i in range(self.info.level_count)]

    def keep_overview(self) -> bool:
        """Start decoding the smallest level into memory on a background thread (if it is at
        most `tiles.KEEP_WHOLE_BYTES`); napari's thumbnail and first view read it from there.
        Call it early (before building a viewer) so the decode overlaps other start-up work."""
        return self._tiles.keep_whole(self.info.level_count - 1)

    # -- context management ---------------------------------------------------------------
    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._source.close()

    def __repr__(self) -> str:
        w, h = self.info.dimensions
        name, levels, backend = Path(self.info.path).name, self.info.level_count, self.info.backend
        return f"Slide({name!r}, {w}x{h}, levels={levels}, backend={backend})"

    def tile_counts(self) -> tuple[int, int]:
        """(unreadable, read) native tiles since the slide was opened: unreadable ones are
        served as background, so callers judge whether what they computed still means much."""
        return len(self._tiles.bad_tiles), self._tiles.tiles_read

    # -- metadata helpers -----------------------------------------------------------------
    def require_mpp(self) -> float:
        """The mpp, or UnknownMppError telling the user to pass an override."""
        if self.info.mpp is None:
            raise UnknownMppError(
                f"{Path(self.info.path).name}: microns per pixel unknown (no vendor or TIFF resolution "
                "metadata); pass an override, e.g. --mpp 0.5"
            )
        return self.info.mpp

    def best_level_for_downsample(self, downsample: float) -> int:
        """Largest level whose downsample is <= the given one (1 % tolerance)."""
        best = 0
        for i, ds in enumerate(self.info.level_downsamples):
            if ds <= downsample * 1.01:
                best = i
        return best

    # -- pixel access ---------------------------------------------------------------------
    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.info.level_count:
            raise SlideError(f"level {level} out of range (slide has {self.info.level_count} levels)")

    def read_level(self, *, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 of a level-pixel rectangle; outside the image is background."""
        self._check_level(level)
        if width < 0 or height < 0:
            raise SlideError(f"region size must be non-negative, got {width}x{height}")
        return self._tiles.read(level, y, y + height, x, x + width)

    def read_region_level0(self, *, x: int, y: int, width: int, height: int, level: int) -> np.ndarray:
        """Like OpenSlide's read_region: top-left in level-0 pixels, size in level pixels.
        The level-0 origin maps to the nearest level pixel (no sub-pixel resampling)."""
        self._check_level(level)
        ds = self.info.level_downsamples[level]
        return self.read_level(level=level, x=round(x / ds), y=round(y / ds), width=width, height=height)

    def thumbnail(self, *, max_size: int = 1024) -> np.ndarray:
        """RGB thumbnail whose longer side is max_size (never upscaled), from the smallest
        level that is still at least max_size, box-averaged in blocks so memory stays small."""
        from PIL import Image

        if max_size < 1:
            raise SlideError(f"max_size must be positive, got {max_size}")
        level = 0
        for i, (w, h) in enumerate(self.info.level_dimensions):
            if max(w, h) >= max_size:
                level = i
        arr = self.pyramid[level]
        h, w = arr.shape[:2]
        factor = max(1, int(max(w, h) // (2 * max_size)))
        image = _block_reduce(arr, factor) if factor > 1 else arr[:]
        scale = max_size / max(w, h)
        if scale >= 1:
            return np.ascontiguousarray(image)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def _block_reduce(arr, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks, read in ~2048-px windows (bounded memory)."""
    h, w = arr.shape[:2]
    oh, ow = -(-h // factor), -(-w // factor)
    out = np.empty((oh, ow, 3), dtype=np.uint8)
    step = max(1, 2048 // factor) * factor
    for y in range(0, h, step):
        for x in range(0, w, step):
            block = arr[y : y + step, x : x + step].astype(np.float32)
            bh, bw = block.shape[:2]
            ph, pw = -(-bh // factor) * factor, -(-bw // factor) * factor
            if (ph, pw) != (bh, bw):
                block = np.pad(block, ((0, ph - bh), (0, pw - bw), (0, 0)), mode="edge")
            red = block.reshape(ph // factor, factor, pw // factor, factor, 3).mean(axis=(1, 3))
            out[y // factor : y // factor + red.shape[0], x // factor : x // factor + red.shape[1]] = np.rint(red)
    return out


_BACKENDS = ("auto", "tifffile", "openslide")


def open_slide(path: str | os.PathLike, *, mpp: float | None = None, backend: str = "auto") -> Slide:
    """Open a whole-slide image; raises SlideError (one line) for anything unreadable.

    `mpp` overrides the file's microns per pixel (source "user"); `backend` forces the pixel
    backend ("auto" picks tifffile for TIFF-family files it can serve, else OpenSlide)."""
    p = Path(path)
    user_mpp = check_user_mpp(mpp)
    if backend not in _BACKENDS:
        raise SlideError(f"unknown slide backend {backend!r}; use one of {', '.join(_BACKENDS)}")
    if not p.exists():
        raise SlideError(f"slide not found: {p}")
    if p.is_dir():
        raise SlideError(f"{p} is a directory, not a slide file")
    if p.stat().st_size == 0:
        raise SlideError(f"{p.name} is empty (0 bytes)")
    osr, os_error = _try_openslide(p)
    vendor = osr.properties.get("openslide.vendor") if osr is not None else None
    source, tiff_error = None, None
    try:
        if backend == "openslide" and osr is None:
            raise SlideError(f"OpenSlide cannot open {p.name} ({os_error})")
        if backend != "openslide" and (vendor in _TIFFFILE_VENDORS or backend == "tifffile") and has_tiff_magic(p):
            source, tiff_error = _try_tifffile(p, osr)
        if source is None and backend == "tifffile":
            raise SlideError(f"tifffile cannot serve {p.name} ({tiff_error or 'not a TIFF'})")
        if source is None and osr is not None:
            background = parse_hex_colour(osr.properties.get("openslide.background-color"))
            check_level_count(int(osr.level_count), name=p.name)
            source = OpenSlideSource(osr, background=background)
            check_plausible(source.levels, name=p.name)
        if source is None:
            reason = tiff_error or os_error or "unknown format"
            if has_tiff_magic(p):
                raise SlideError(f"cannot read {p.name}: unsupported or corrupt TIFF ({reason})")
            raise SlideError(f"{p.name} is not a whole-slide image OpenSlide or tifffile can read ({reason})")
        info = _build_info(p, source, osr, user_mpp)
    except BaseException:
        if source is not None:
            source.close()  # an OpenSlideSource closes its OpenSlide handle too
        if osr is not None and not isinstance(source, OpenSlideSource):
            osr.close()
        raise
    if osr is not None and not isinstance(source, OpenSlideSource):
        osr.close()
    tiles = SlideTiles(source, background=info.background, name=p.name)
    cw, ch = tiles.chunk_sizes[0]
    return Slide(info=replace(info, tile_size=(cw, ch)), source=source, tiles=tiles)


def _try_openslide(p: Path):
    import openslide

    try:
        if openslide.OpenSlide.detect_format(str(p)) is None:
            return None, "OpenSlide: unrecognised format"
        return openslide.OpenSlide(str(p)), None
    except openslide.OpenSlideError as exc:  # includes unsupported-format errors
        return None, f"OpenSlide: {exc}"
    except OSError as exc:
        return None, f"OpenSlide: {exc}"


def _try_tifffile(p: Path, osr):
    """A TiffSource, or (None, reason) when tifffile cannot serve this file."""
    import tifffile

    background = (255, 255, 255)
    if osr is not None:
        background = parse_hex_colour(osr.properties.get("openslide.background-color"))
    try:
        source = TiffSource(p, background=background)
    except UnsupportedLayout as exc:
        return None, f"tifffile: {exc}"
    except SlideError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError, struct.error, LookupError, TypeError, RuntimeError) as exc:
        if osr is None:
            raise SlideError(f"cannot read {p.name}: corrupt or truncated TIFF ({exc})") from None
        return None, f"tifffile: {exc}"
    if osr is not None and (source.levels[0].width, source.levels[0].height) != tuple(osr.dimensions):
        source.close()
        return None, "tifffile and OpenSlide disagree on level-0 size"
    return source, None


def _build_info(p: Path, source, osr, user_mpp: float | None) -> SlideInfo:
    props = dict(osr.properties) if osr is not None else {}
    vendor = props.get("openslide.vendor")
    geoms = source.levels
    w0, h0 = geoms[0].width, geoms[0].height
    if isinstance(source, OpenSlideSource):
        downsamples = tuple(source.downsamples)
    else:
        downsamples = tuple((w0 / g.width + h0 / g.height) / 2 for g in geoms)
    vendor_mpp = tiff_mpp = None
    os_mpp = (parse_float(props.get("openslide.mpp-x")), parse_float(props.get("openslide.mpp-y")))
    if None not in os_mpp:
        if vendor == "generic-tiff":
            tiff_mpp = os_mpp
        else:
            vendor_mpp = os_mpp
    objective = parse_float(props.get("openslide.objective-power"))
    if isinstance(source, TiffSource):
        tif = source.tif
        if vendor_mpp is None and tif.is_ome:
            vendor_mpp = _ome_mpp(tif.ome_metadata)
        if tiff_mpp is None:
            tiff_mpp = _resolution_mpp(tif.series[0].levels[0].keyframe)
        if objective is None and tif.is_svs:
            m = re.search(r"AppMag\s*=\s*([\d.]+)", tif.pages[0].description or "")
            objective = parse_float(m.group(1)) if m else None
        if tif.is_ome:
            vendor = "ome-tiff"
        elif vendor is None:
            vendor = "aperio" if tif.is_svs else "tiff"
    mpp_x, mpp_y, source_name = resolve_mpp(user=user_mpp, vendor=vendor_mpp, tiff_resolution=tiff_mpp)
    if "openslide.quickhash-1" in props:
        slide_id = props["openslide.quickhash-1"]
    else:
        slide_id = CONTENT_HASH_PREFIX + source.content_hash()
    return SlideInfo(
        path=str(p.resolve()),
        slide_id=slide_id,
        vendor=vendor or "unknown",
        backend=source.backend,
        level_dimensions=tuple((g.width, g.height) for g in geoms),
        level_downsamples=downsamples,
        mpp=None if mpp_x is None else (mpp_x + mpp_y) / 2,
        mpp_source=source_name,
        objective_power=objective,
        background=parse_hex_colour(props.get("openslide.background-color")),
        tile_size=(geoms[0].tile_width, geoms[0].tile_height),
        mpp_x=mpp_x,
        mpp_y=mpp_y,
    )


def _resolution_mpp(page) -> tuple[float, float] | None:
    """µm per pixel from X/YResolution when the unit is inch or centimetre."""
    import tifffile

    unit = page.tags.get("ResolutionUnit")
    xr, yr = page.tags.get("XResolution"), page.tags.get("YResolution")
    if unit is None or xr is None or yr is None:
        return None
    per_unit = {int(tifffile.RESUNIT.INCH): 25400.0, int(tifffile.RESUNIT.CENTIMETER): 10000.0}.get(int(unit.value))
    try:
        x = xr.value[0] / xr.value[1]
        y = yr.value[0] / yr.value[1]
    except (TypeError, ZeroDivisionError, IndexError):
        return None
    if per_unit is None or x <= 0 or y <= 0:
        return None
    return per_unit / x, per_unit / y


_OME_UNITS = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_mpp(xml: str | None) -> tuple[float, float] | None:
    if not xml:
        return None
    pixels = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", xml)
    if pixels is None:
        return None
    tag = pixels.group(0)

    def attr(name: str) -> str | None:
        m = re.search(rf'\b{name}="([^"]*)"', tag)
        return m.group(1) if m else None

    out = []
    for axis in ("X", "Y"):
        value = parse_float(attr(f"PhysicalSize{axis}"))
        scale = _OME_UNITS.get(attr(f"PhysicalSize{axis}Unit") or "µm")
        if value is None or scale is None:
            return None
        out.append(value * scale)
    return out[0], out[1]

