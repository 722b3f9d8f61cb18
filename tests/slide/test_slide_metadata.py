"""Metadata: levels, downsamples, the mpp chain, objective power, slide ids, is_slide_path."""

from __future__ import annotations

import dataclasses

import numpy as np
import openslide
import pytest

from napari_dismm.slide import SlideInfo, is_slide_path, open_slide
from napari_dismm.slide.info import CONTENT_HASH_PREFIX, parse_hex_colour, resolve_mpp
from tests.slide_fixtures import odd_slide_zlib, write_ome_pyramid, write_stripped_tiff  # noqa: F401


def test_cmu_metadata(cmu_slide_path):
    with open_slide(cmu_slide_path) as slide:
        info = slide.info
        assert isinstance(info, SlideInfo)
        assert info.vendor == "aperio" and info.backend == "tifffile"
        assert info.level_dimensions == ((2220, 2967),) and info.level_downsamples == (1.0,)
        assert info.mpp == pytest.approx(0.499) and info.mpp_source == "vendor"
        assert info.objective_power == 20
        assert info.background == (255, 255, 255)
        quickhash = openslide.OpenSlide(str(cmu_slide_path)).properties["openslide.quickhash-1"]
        assert info.slide_id == quickhash
        with pytest.raises(dataclasses.FrozenInstanceError):
            info.mpp = 1.0  # type: ignore[misc]


def test_user_override_wins_and_is_recorded(cmu_slide_path):
    with open_slide(cmu_slide_path, mpp=0.25) as slide:
        assert slide.info.mpp == 0.25 and slide.info.mpp_source == "user"
        assert slide.require_mpp() == 0.25


def test_generated_slide_metadata(odd_slide_zlib):
    with open_slide(odd_slide_zlib.path) as slide:
        info = slide.info
        assert info.vendor == "generic-tiff"
        assert info.mpp == pytest.approx(0.25) and info.mpp_source == "tiff-resolution"
        assert info.level_dimensions == odd_slide_zlib.level_dimensions
        w0, h0 = info.level_dimensions[0]
        for (w, h), ds in zip(info.level_dimensions, info.level_downsamples, strict=True):
            assert ds == pytest.approx((w0 / w + h0 / h) / 2)
        osr = openslide.OpenSlide(str(odd_slide_zlib.path))
        assert info.slide_id == osr.properties["openslide.quickhash-1"]
        assert np.allclose(info.level_downsamples, osr.level_downsamples, rtol=1e-9)


def test_best_level_for_downsample(odd_slide_zlib):
    with open_slide(odd_slide_zlib.path) as slide:
        ds = slide.info.level_downsamples  # 1, ~2.0005, ~4.002
        assert slide.best_level_for_downsample(1.0) == 0
        assert slide.best_level_for_downsample(1.9) == 0
        assert slide.best_level_for_downsample(2.0) == 1  # 2.0005 counts as 2 (tolerance)
        assert slide.best_level_for_downsample(3.9) == 1
        assert slide.best_level_for_downsample(100) == len(ds) - 1


def test_thumbnail(odd_slide_zlib):
    with open_slide(odd_slide_zlib.path) as slide:
        thumb = slide.thumbnail(max_size=300)
        assert thumb.dtype == np.uint8 and max(thumb.shape[:2]) == 300 and thumb.shape[2] == 3
        w, h = slide.info.dimensions
        assert abs(thumb.shape[1] / thumb.shape[0] - w / h) < 0.02


def test_ome_subifd_pyramid_read_by_tifffile(tmp_path):
    path = tmp_path / "pyr.ome.tif"
    levels = write_ome_pyramid(path, mpp=0.5)
    with open_slide(path) as slide:
        assert slide.info.vendor == "ome-tiff" and slide.info.backend == "tifffile"
        assert slide.info.level_count == 3  # OpenSlide alone sees only the first
        assert slide.info.mpp == 0.5 and slide.info.mpp_source == "vendor"
        for arr, ref in zip(slide.pyramid, levels, strict=True):
            np.testing.assert_array_equal(arr[:], ref)


def test_content_hash_for_files_openslide_cannot_open(tmp_path):
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    write_stripped_tiff(a, width=400, height=300, rowsperstrip=32, resolution=25400 / 0.5)
    write_stripped_tiff(b, width=400, height=300, rowsperstrip=32, resolution=25400 / 0.5)
    with open_slide(a) as sa, open_slide(b) as sb:
        assert sa.info.slide_id.startswith(CONTENT_HASH_PREFIX)
        assert sa.info.slide_id == sb.info.slide_id  # content, not path
        assert sa.info.mpp == pytest.approx(0.5) and sa.info.mpp_source == "tiff-resolution"
    img = np.zeros((300, 400, 3), np.uint8)
    import tifffile

    tifffile.imwrite(b, img, photometric="rgb", rowsperstrip=32, metadata=None)
    with open_slide(b) as sb:
        assert sb.info.slide_id != sa.info.slide_id


def test_screen_resolution_is_not_an_mpp(tmp_path):
    path = tmp_path / "screenshot.tif"
    write_stripped_tiff(path, width=200, height=100, rowsperstrip=50, resolution=72)
    with open_slide(path) as slide:
        assert slide.info.mpp is None and slide.info.mpp_source == "unknown"


def test_resolve_mpp_chain():
    assert resolve_mpp(user=None, vendor=(0.5, 0.5), tiff_resolution=(0.25, 0.25)) == (0.5, 0.5, "vendor")
    assert resolve_mpp(user=0.3, vendor=(0.5, 0.5), tiff_resolution=None) == (0.3, 0.3, "user")
    assert resolve_mpp(user=None, vendor=None, tiff_resolution=(0.25, 0.26)) == (0.25, 0.26, "tiff-resolution")
    assert resolve_mpp(user=None, vendor=None, tiff_resolution=(352.8, 352.8)) == (None, None, "unknown")


def test_background_colour_property():
    assert parse_hex_colour("FFEEDD") == (255, 238, 221)
    assert parse_hex_colour(None) == (255, 255, 255)
    assert parse_hex_colour("zz") == (255, 255, 255)


def test_is_slide_path(tmp_path, cmu_slide_path, odd_slide_zlib):
    assert is_slide_path(cmu_slide_path)
    assert is_slide_path(odd_slide_zlib.path)
    renamed = tmp_path / "slide.bin"
    renamed.write_bytes(odd_slide_zlib.path.read_bytes()[:1000])
    assert is_slide_path(renamed)  # TIFF magic bytes
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert not is_slide_path(text)
    assert not is_slide_path(tmp_path)
    assert not is_slide_path(tmp_path / "missing.svs")
