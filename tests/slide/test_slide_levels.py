"""The lazy level arrays napari reads (`slide.levels.LevelArray`): numpy indexing gives the
file's pixels, exactly as the array written and as the zarr-3 view of the same tiles."""

from __future__ import annotations

import numpy as np
import pytest

from napari_dismm.slide import open_slide
from tests.slide_fixtures import write_stripped_tiff

KEYS = [
    np.s_[:],
    np.s_[...],
    np.s_[10:700, 300:1400],
    np.s_[5:-3:7, ::-3],
    np.s_[::-1, 100:90],  # an empty x range
    np.s_[-1],
    np.s_[3, 4],
    np.s_[3, 4, 1],
    np.s_[..., 2],
    np.s_[1000:, :, ::-1],
    np.s_[np.int64(7), 2:9],
    np.s_[-5000:50, 1490:99999],  # clipped like numpy
]


@pytest.fixture(scope="module")
def stripped(tmp_path_factory):
    path = tmp_path_factory.mktemp("levels") / "plain.tif"
    return path, write_stripped_tiff(path, width=1500, height=1300, rowsperstrip=16)


@pytest.mark.parametrize("key", KEYS, ids=[str(k) for k in KEYS])
def test_level_indexing_matches_numpy(stripped, key):
    path, img = stripped
    with open_slide(path) as slide:
        got = slide.pyramid[0][key]
        want = img[key]
        assert got.shape == want.shape and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)


def test_level_protocol_and_errors(stripped):
    path, img = stripped
    with open_slide(path) as slide:
        level = slide.pyramid[0]
        assert (level.shape, level.dtype, level.ndim, level.size, len(level)) == (img.shape, np.uint8, 3, img.size, 1300)
        np.testing.assert_array_equal(np.asarray(level), img)
        assert np.asarray(level, dtype=np.float32).dtype == np.float32
        with pytest.raises(IndexError):
            level[1300]
        with pytest.raises(IndexError):
            level[0, 0, 0, 0]
        with pytest.raises(TypeError):
            level[[1, 2]]


def test_zarr_view_equals_levels_on_the_real_slide(cmu_slide_path):
    """The CMU slide (JPEG tiles, 720-px chunks of 240-px tiles) through both views."""
    with open_slide(cmu_slide_path) as slide:
        zarr_levels = slide.zarr_pyramid()
        assert [z.shape for z in zarr_levels] == [a.shape for a in slide.pyramid]
        assert zarr_levels[0].chunks == slide.pyramid[0].chunks
        whole = np.asarray(slide.pyramid[0])
        np.testing.assert_array_equal(zarr_levels[0][:], whole)
        np.testing.assert_array_equal(zarr_levels[0][701:1459, 233:1999], slide.pyramid[0][701:1459, 233:1999])
        assert whole.std() > 10  # real tissue, not a background fill


def test_reads_in_a_forked_child(stripped):
    """The tile pool is per process: a child forked after the parent used it still reads."""
    import multiprocessing

    path, img = stripped
    with open_slide(path) as slide:
        np.asarray(slide.pyramid[0])  # the parent's pool is running
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            got = pool.apply_async(_child_sum, (str(path),)).get(timeout=60)
    assert got == int(img.sum(dtype=np.int64))


def _child_sum(path: str) -> int:
    with open_slide(path) as slide:
        return int(np.asarray(slide.pyramid[0]).sum(dtype=np.int64))


@pytest.mark.parametrize("key", KEYS, ids=[str(k) for k in KEYS])
def test_kept_overview_serves_the_same_pixels(stripped, key):
    """`Slide.keep_overview` (decoded once on a thread for napari's start) changes no pixel."""
    path, img = stripped
    with open_slide(path) as slide:
        assert slide.keep_overview()
        level = slide.pyramid[-1]
        np.testing.assert_array_equal(level[key], img[key])  # waits for the decode
        tiles_before = slide.tile_counts()[1]
        np.testing.assert_array_equal(slide.read_level(level=0, x=-20, y=1290, width=60, height=30),
                                      _with_background(img, slide, x=-20, y=1290, width=60, height=30))
        assert slide.tile_counts()[1] == tiles_before  # served from memory, no tile decoded again


def _with_background(img, slide, *, x, y, width, height):
    out = np.empty((height, width, 3), np.uint8)
    out[:] = slide._tiles.background
    ys, xs = max(y, 0), max(x, 0)
    ye, xe = min(y + height, img.shape[0]), min(x + width, img.shape[1])
    out[ys - y : ye - y, xs - x : xe - x] = img[ys:ye, xs:xe]
    return out


def test_large_levels_are_not_kept(stripped, monkeypatch):
    from napari_dismm.slide import tiles

    monkeypatch.setattr(tiles, "KEEP_WHOLE_BYTES", 1000)
    path, img = stripped
    with open_slide(path) as slide:
        assert not slide.keep_overview()
        np.testing.assert_array_equal(slide.pyramid[0][:50, :60], img[:50, :60])
