"""Generated slides for the slide-layer tests (importable by other test modules).

Fixtures are session-scoped and written once into a session temp directory. Import the
fixture names into a test module (``from tests.slide_fixtures import odd_slide``) to use
them; the plain ``write_*`` helpers can be called directly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_dismm.slide.synthetic import SampleSlide, write_sample_slide

#: Odd sizes (not tile multiples): level 1 is 2000 x 1200, downsample 2.0005 / 2.0008.
ODD_SIZE = (4001, 2401)
#: Planted green squares (x, y, size) far from the origin, for the no-drift check.
ODD_MARKERS = ((3601, 2117, 200), (2999, 117, 160))
BIG_SIZE = (100_000, 80_000)


def write_rgba_tiff(path: Path, *, width: int = 700, height: int = 530, tile: int = 256) -> np.ndarray:
    """Tiled RGBA TIFF (unassociated alpha) with opaque, transparent and half-transparent
    pixels; returns the RGBA array written."""
    rng = np.random.default_rng(3)
    rgba = np.empty((height, width, 4), dtype=np.uint8)
    rgba[..., :3] = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    alpha = np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))
    alpha[: height // 4] = 0  # fully transparent band
    alpha[-height // 4 :] = 255  # opaque band
    rgba[..., 3] = alpha
    tifffile.imwrite(
        path, rgba, tile=(tile, tile), photometric="rgb", extrasamples=["unassalpha"],
        compression="zlib", metadata=None,
    )
    return rgba


def write_stripped_tiff(path: Path, *, width: int, height: int, rowsperstrip: int, resolution=None) -> np.ndarray:
    """Plain stripped (untiled) RGB TIFF, optionally with resolution tags in inches."""
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    kwargs = {}
    if resolution is not None:
        kwargs = {"resolution": (resolution, resolution), "resolutionunit": "INCH"}
    tifffile.imwrite(
        path, img, photometric="rgb", rowsperstrip=rowsperstrip, compression="zlib", metadata=None, **kwargs
    )
    return img


def write_ome_pyramid(path: Path, *, width: int = 1500, height: int = 1100, mpp: float = 0.5) -> list[np.ndarray]:
    """OME-TIFF with a SubIFD pyramid (OpenSlide sees at most its first level)."""
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    levels = [base, base[::2, ::2].copy(), base[::4, ::4].copy()]
    meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(levels[0], subifds=2, tile=(256, 256), photometric="rgb", compression="zlib", metadata=meta)
        for lvl in levels[1:]:
            tw.write(lvl, subfiletype=1, tile=(256, 256), photometric="rgb", compression="zlib")
    return levels


def corrupt_tile(path: Path, *, level: int, index: int) -> None:
    """Overwrite one stored tile's bytes with garbage (the file stays the same size)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[level].keyframe
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00\xff" * (count // 2))


def truncated_copy(src: Path, dst: Path, *, fraction: float) -> Path:
    shutil.copyfile(src, dst)
    size = dst.stat().st_size
    with open(dst, "r+b") as fh:
        fh.truncate(int(size * fraction))
    return dst


@pytest.fixture(scope="session")
def odd_slide(tmp_path_factory) -> SampleSlide:
    """4-level JPEG pyramid, odd size, 240-px tiles (chunks regroup 3 x 3 tiles)."""
    path = tmp_path_factory.mktemp("slides") / "odd.tif"
    return write_sample_slide(
        path, width=ODD_SIZE[0], height=ODD_SIZE[1], tile=240, n_levels=4, seed=1, markers=ODD_MARKERS,
        tissue_fraction=0.2,
    )


@pytest.fixture(scope="session")
def odd_slide_zlib(tmp_path_factory) -> SampleSlide:
    """Lossless 3-level pyramid with 512-px tiles, odd size."""
    path = tmp_path_factory.mktemp("slides") / "odd_zlib.tif"
    return write_sample_slide(
        path, width=2049, height=1537, tile=512, n_levels=3, seed=2, compression="zlib", tissue_fraction=0.3
    )


@pytest.fixture(scope="session")
def big_slide(tmp_path_factory) -> SampleSlide:
    """100 000 x 80 000 px (mostly background, a little tissue): the memory test's slide."""
    path = tmp_path_factory.mktemp("big") / "big.tif"
    return write_sample_slide(path, width=BIG_SIZE[0], height=BIG_SIZE[1], tissue_fraction=0.004, seed=7)
