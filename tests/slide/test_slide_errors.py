"""Bad input gives one clear SlideError line; an unreadable tile gives background + one
DismmWarning; napari never sees an exception from a chunk read."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from napari_dismm.errors import DismmWarning, SlideError, UnknownMppError
from napari_dismm.slide import open_slide, write_sample_slide
from tests.slide_fixtures import (  # noqa: F401
    corrupt_tile,
    odd_slide_zlib,
    truncated_copy,
    write_stripped_tiff,
)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(SlideError) as exc:
        open_slide(tmp_path / "nope.svs")
    assert "not found" in _one_line(exc)


def test_directory(tmp_path):
    with pytest.raises(SlideError) as exc:
        open_slide(tmp_path)
    assert "directory" in _one_line(exc)


@pytest.mark.parametrize(
    ("name", "content"),
    [("notes.txt", b"hello, not a slide\n" * 50), ("fake.svs", bytes(range(256)) * 40), ("empty.tif", b"")],
)
def test_non_slide_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SlideError) as exc:
        open_slide(path)
    _one_line(exc)


def test_tiff_header_with_garbage(tmp_path):
    path = tmp_path / "broken.tif"
    path.write_bytes(b"II*\x00" + b"\xff" * 4000)
    with pytest.raises(SlideError) as exc:
        open_slide(path)
    assert "TIFF" in _one_line(exc)


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_slide(odd_slide_zlib, tmp_path, fraction):
    path = truncated_copy(odd_slide_zlib.path, tmp_path / "cut.tif", fraction=fraction)
    with pytest.raises(SlideError) as exc:
        open_slide(path)
    msg = _one_line(exc).lower()
    assert "truncated" in msg


def test_small_stripped_tiff_opens_lazily(tmp_path):
    path = tmp_path / "plain.tif"
    img = write_stripped_tiff(path, width=1500, height=1300, rowsperstrip=16)
    with open_slide(path) as slide:
        assert slide.info.backend == "tifffile"
        assert slide.info.slide_id.startswith("dismm-sha256:")  # OpenSlide rejects stripped TIFF
        assert slide.pyramid[0].chunks[:2] == (512, 1024)
        np.testing.assert_array_equal(slide.pyramid[0][:], img)
        np.testing.assert_array_equal(slide.read_level(level=0, x=1100, y=900, width=400, height=400), img[900:, 1100:])


def test_huge_single_strip_tiff_is_refused(tmp_path):
    path = tmp_path / "onestrip.tif"
    import tifffile

    tifffile.imwrite(path, np.zeros((4200, 6000, 3), np.uint8), photometric="rgb", rowsperstrip=4200,
                     compression="zlib", metadata=None)
    with pytest.raises(SlideError) as exc:
        open_slide(path)
    msg = _one_line(exc)
    assert "stripped" in msg and "tile" in msg


def test_corrupt_tile_is_background_with_one_warning(tmp_path):
    path = tmp_path / "bad.tif"
    sample = write_sample_slide(path, width=1800, height=1300, tile=256, n_levels=2, seed=4, tissue_fraction=0.5)
    cols = -(-sample.dimensions[0] // 256)
    corrupt_tile(path, level=0, index=2 * cols + 3)  # tile column 3, row 2: inside the tissue
    with open_slide(path) as slide:
        with pytest.warns(DismmWarning, match=r"level 0, tile column 3, row 2") as record:
            chunk = slide.pyramid[0][512:1024, 512:1024]  # chunk (1, 1) holds tiles (2..3, 2..3)
        assert len([w for w in record if issubclass(w.category, DismmWarning)]) == 1
        bad = chunk[:256, 256:512]
        assert (bad == 255).all()  # the slide's background (white), not zeros
        assert (chunk[:256, :256] != 255).any()  # neighbours still decoded
        with warnings.catch_warnings():
            warnings.simplefilter("error", DismmWarning)
            again = slide.read_level(level=0, x=700, y=500, width=200, height=200)  # warned once per slide
        assert (again[12:, 68:] == 255).all()


def test_bad_level_and_region(odd_slide_zlib):
    with open_slide(odd_slide_zlib.path) as slide:
        with pytest.raises(SlideError):
            slide.read_level(level=9, x=0, y=0, width=1, height=1)
        with pytest.raises(SlideError):
            slide.read_level(level=0, x=0, y=0, width=-1, height=1)


def test_bad_mpp_override(odd_slide_zlib):
    for bad in (0, -0.5, float("nan"), "abc"):
        with pytest.raises(SlideError):
            open_slide(odd_slide_zlib.path, mpp=bad)


def test_unknown_mpp_is_flagged(tmp_path):
    path = tmp_path / "nompp.tif"
    write_stripped_tiff(path, width=300, height=200, rowsperstrip=64)
    with open_slide(path) as slide:
        assert slide.info.mpp is None and slide.info.mpp_source == "unknown"
        with pytest.raises(UnknownMppError) as exc:
            slide.require_mpp()
        assert "override" in _one_line(exc)
