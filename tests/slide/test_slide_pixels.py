"""Pixel exactness: level 0 equals OpenSlide, every other level equals the file's own
pixels for that level, at random regions and at the right/bottom edges; no drift."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile

from napari_dismm.slide import open_slide
from napari_dismm.slide.pixels import composite
from tests.slide_fixtures import ODD_MARKERS, odd_slide, odd_slide_zlib, write_rgba_tiff  # noqa: F401


def _regions(width: int, height: int, *, n: int, seed: int) -> list[tuple[int, int, int, int]]:
    """Random (x, y, w, h) inside the level plus regions touching the right/bottom edges."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = int(rng.integers(1, min(700, width) + 1)), int(rng.integers(1, min(700, height) + 1))
        out.append((int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h))
    w, h = min(333, width), min(271, height)
    out += [(width - w, height - h, w, h), (width - w, 0, w, h), (0, height - h, w, h), (width - 1, height - 1, 1, 1)]
    return out


def _openslide_rgb(osr, x, y, w, h, background=(255, 255, 255)) -> np.ndarray:
    rgba = np.asarray(osr.read_region((x, y), 0, (w, h)))
    return composite(rgba[..., :3], rgba[..., 3], background, premultiplied=False)


@pytest.fixture(params=["odd_slide", "odd_slide_zlib"])
def generated(request):
    return request.getfixturevalue(request.param)


def test_level0_equals_openslide_generated(generated):
    with open_slide(generated.path) as slide, openslide.OpenSlide(str(generated.path)) as osr:
        assert slide.info.backend == "tifffile"
        width, height = slide.info.dimensions
        for x, y, w, h in _regions(width, height, n=12, seed=0):
            ours = slide.pyramid[0][y : y + h, x : x + w]
            np.testing.assert_array_equal(ours, _openslide_rgb(osr, x, y, w, h), err_msg=f"region {(x, y, w, h)}")


def test_every_level_equals_stored_pixels(generated):
    with open_slide(generated.path) as slide, tifffile.TiffFile(generated.path) as tif:
        levels = tif.series[0].levels
        assert len(slide.pyramid) == len(levels) >= 3
        for level in range(len(levels)):
            stored = levels[level].asarray()
            arr = slide.pyramid[level]
            assert arr.shape == stored.shape
            for x, y, w, h in _regions(stored.shape[1], stored.shape[0], n=6, seed=level):
                np.testing.assert_array_equal(arr[y : y + h, x : x + w], stored[y : y + h, x : x + w])
                np.testing.assert_array_equal(
                    slide.read_level(level=level, x=x, y=y, width=w, height=h), stored[y : y + h, x : x + w]
                )


def test_odd_sizes_give_non_integer_downsamples(odd_slide):
    with open_slide(odd_slide.path) as slide:
        ds = slide.info.level_downsamples
        assert ds[0] == 1.0
        assert abs(ds[1] - 2.0) > 1e-4  # 4001 / 2000 = 2.0005
        assert slide.info.level_dimensions[1] == (2000, 1200)
        assert slide.info.tile_size == (720, 720)  # 3 x 240-px native tiles
        assert all(a.chunks[:2] == (720, 720) for a in slide.pyramid)


def test_planted_markers_do_not_drift(odd_slide):
    """A green square planted at level-0 (x, y) is found at (x, y) / ds on every level."""
    with open_slide(odd_slide.path) as slide:
        for level, (lw, lh) in enumerate(slide.info.level_dimensions):
            dsx, dsy = odd_slide.dimensions[0] / lw, odd_slide.dimensions[1] / lh
            for mx, my, size in ODD_MARKERS:
                cx, cy = (mx + size / 2) / dsx, (my + size / 2) / dsy
                r = int(size / dsx) + 8
                x0, y0 = int(cx) - r, int(cy) - r
                patch = slide.read_level(level=level, x=x0, y=y0, width=2 * r, height=2 * r).astype(int)
                green = (patch[..., 1] - patch[..., 0] > 80) & (patch[..., 1] - patch[..., 2] > 80)
                assert green.sum() > 0.5 * (size / dsx) ** 2, f"marker missing at level {level}"
                ys, xs = np.nonzero(green)
                assert abs(x0 + xs.mean() + 0.5 - cx) < 1.0, f"x drift at level {level}"
                assert abs(y0 + ys.mean() + 0.5 - cy) < 1.0, f"y drift at level {level}"


def test_real_cmu_slide_matches_openslide(cmu_slide_path):
    with open_slide(cmu_slide_path) as slide, openslide.OpenSlide(str(cmu_slide_path)) as osr:
        assert slide.info.dimensions == (2220, 2967)
        assert slide.info.tile_size == (720, 720)
        for x, y, w, h in _regions(2220, 2967, n=8, seed=5):
            np.testing.assert_array_equal(slide.pyramid[0][y : y + h, x : x + w], _openslide_rgb(osr, x, y, w, h))
        full = slide.pyramid[0][:]
        np.testing.assert_array_equal(full, np.asarray(osr.read_region((0, 0), 0, (2220, 2967)).convert("RGB")))


def test_rgba_composites_onto_background_not_black(tmp_path):
    path = tmp_path / "rgba.tif"
    rgba = write_rgba_tiff(path)
    with open_slide(path) as slide, openslide.OpenSlide(str(path)) as osr:
        assert slide.info.background == (255, 255, 255)
        got = slide.pyramid[0][:]
        transparent = rgba[..., 3] == 0
        assert (got[transparent] == 255).all()  # white, not black
        opaque = rgba[..., 3] == 255
        np.testing.assert_array_equal(got[opaque], rgba[..., :3][opaque])
        a = rgba[..., 3:].astype(float) / 255
        expected = np.rint(rgba[..., :3] * a + 255 * (1 - a))
        assert np.abs(got - expected).max() <= 1
        # OpenSlide hands back un-premultiplied RGBA (rounding loses up to one level)
        ref = _openslide_rgb(osr, 0, 0, *slide.info.dimensions)
        assert np.abs(got.astype(int) - ref).max() <= 1


def test_composite_uses_given_background():
    rgb = np.zeros((2, 2, 3), np.uint8)
    alpha = np.array([[0, 255], [128, 0]], np.uint8)
    out = composite(rgb, alpha, (200, 100, 50), premultiplied=False)
    assert tuple(out[0, 0]) == (200, 100, 50)
    assert tuple(out[0, 1]) == (0, 0, 0)
    assert tuple(out[1, 0]) == (100, 50, 25)


def test_read_region_level0_and_outside_fill(odd_slide):
    with open_slide(odd_slide.path) as slide:
        ds = slide.info.level_downsamples[2]
        a = slide.read_region_level0(x=2000, y=1000, width=100, height=80, level=2)
        b = slide.read_level(level=2, x=round(2000 / ds), y=round(1000 / ds), width=100, height=80)
        np.testing.assert_array_equal(a, b)
        w, h = slide.info.level_dimensions[1]
        out = slide.read_level(level=1, x=w - 10, y=-5, width=30, height=20)
        assert out.shape == (20, 30, 3)
        assert (out[:5] == 255).all() and (out[:, 10:] == 255).all()
        np.testing.assert_array_equal(out[5:, :10], slide.pyramid[1][0:15, w - 10 : w])


def test_openslide_backend_level0_exact_and_levels_aligned(odd_slide):
    """The OpenSlide path (used for MIRAX, NDPI, ...) forced on a TIFF: level 0 is exact;
    reduced levels come from read_region at round(ds) and stay within a pixel of the truth."""
    with open_slide(odd_slide.path, backend="openslide") as slide, openslide.OpenSlide(str(odd_slide.path)) as osr:
        assert slide.info.backend == "openslide"
        assert slide.info.level_dimensions == osr.level_dimensions
        assert slide.info.slide_id == osr.properties["openslide.quickhash-1"]
        width, height = slide.info.dimensions
        for x, y, w, h in _regions(width, height, n=4, seed=9):
            np.testing.assert_array_equal(slide.pyramid[0][y : y + h, x : x + w], _openslide_rgb(osr, x, y, w, h))
        for level in range(1, slide.info.level_count):
            ds = slide.info.level_downsamples[level]
            for mx, my, size in ODD_MARKERS:
                cx, cy = (mx + size / 2) / ds, (my + size / 2) / ds
                r = int(size / ds) + 8
                patch = slide.read_level(level=level, x=int(cx) - r, y=int(cy) - r, width=2 * r, height=2 * r)
                patch = patch.astype(int)
                ys, xs = np.nonzero((patch[..., 1] - patch[..., 0] > 80) & (patch[..., 1] - patch[..., 2] > 80))
                assert abs(int(cx) - r + xs.mean() + 0.5 - cx) < 1.5 and abs(int(cy) - r + ys.mean() + 0.5 - cy) < 1.5


def test_unknown_backend_rejected(odd_slide_zlib):
    from napari_dismm.errors import SlideError

    with pytest.raises(SlideError, match="backend"):
        open_slide(odd_slide_zlib.path, backend="vips")
