"""Tissue + tiling on real files: generated TIFF pyramids with a planted layout (through the
slide layer) and the real CMU Aperio slide."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_dismm.errors import DismmWarning, SlideError, UnknownMppError
from napari_dismm.slide import open_slide, write_sample_slide
from napari_dismm.tiling import iter_patch_batches, make_grid, read_patches, resize_patch
from napari_dismm.tissue import detect_tissue, require_tissue
from tests.slide.test_tissue import _exact_fraction

#: Odd sizes: level 1 is 1792 x 1344 (ds 2.0006 / 2.0007), level 2 896 x 672 (ds 4.0011 / 4.0015).
ODD_SIZE = (3585, 2689)
#: Green squares (x, y, size) planted far from the origin, for the no-drift check.
ODD_MARKERS = ((3001, 2101, 160), (1811, 2311, 120))  # in different 10x and 20x patches


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """A generated 3-level JPEG pyramid at 0.25 µm/px with a known layout, opened."""
    path = tmp_path_factory.mktemp("tiling") / "odd.tif"
    truth = write_sample_slide(
        path, width=ODD_SIZE[0], height=ODD_SIZE[1], mpp=0.25, tile=256, n_levels=3, seed=1, markers=ODD_MARKERS
    )
    with open_slide(path) as slide:
        yield truth, slide, detect_tissue(slide)


@pytest.mark.parametrize("target_mpp, patch0, level, min_each", [(1.0, 896, 2, 1), (0.5, 448, 1, 8)])
def test_sample_grid_follows_planted_layout(odd, target_mpp, patch0, level, min_each):
    truth, slide, tissue = odd
    grid = make_grid(slide, target_mpp=target_mpp, tissue=tissue, min_tissue=0.25)
    assert grid.patch_size_level0 == patch0 and grid.level == level
    assert (grid.coords % patch0 == 0).all()
    w0, h0 = ODD_SIZE
    assert (grid.coords >= 0).all() and (grid.coords + patch0 <= (w0, h0)).all()

    kept = {tuple(c) for c in grid.coords.tolist()}
    offsets = np.arange(8, patch0, 16)  # dense sample points inside each box
    inside = background = 0
    for y in range(0, h0 - patch0 + 1, patch0):
        for x in range(0, w0 - patch0 + 1, patch0):
            labels = truth.labels_at((x + offsets)[None, :], (y + offsets)[:, None])
            if (labels > 0).all():
                inside += 1
                assert (x, y) in kept, f"patch {(x, y)} lies in planted tissue"
            elif (labels == 0).all():
                background += 1
                assert (x, y) not in kept, f"patch {(x, y)} is planted background"
    assert inside >= min_each and background >= min_each  # both cases are exercised

    ref = np.array([_exact_fraction(tissue.mask, tissue.downsample, (x, y, patch0, patch0)) for x, y in grid.coords])
    np.testing.assert_allclose(grid.tissue_fraction, ref, atol=1e-5)
    assert (ref >= 0.25 - 1e-9).all()


def _green_edges(patch: np.ndarray) -> tuple[int, int]:
    """Left and top edge (patch px) of the planted green marker."""
    p = patch.astype(int)
    green = (p[..., 1] > 150) & (p[..., 0] < 120) & (p[..., 2] < 120)
    return int(np.flatnonzero(green.any(axis=0)).min()), int(np.flatnonzero(green.any(axis=1)).min())


@pytest.mark.parametrize("target_mpp, level", [(1.0, 2), (0.5, 1)])
def test_sample_reads_reduced_level_without_drift(odd, target_mpp, level):
    """Reads come from level 2 (ds 4.0011 / 4.0015) at 10x and level 1 (ds 2.0006) at 20x;
    the green markers planted far from the origin land where level 0 puts them."""
    _, slide, tissue = odd
    grid = make_grid(slide, target_mpp=target_mpp, tissue=tissue, min_tissue=0.0)
    w0, h0 = ODD_SIZE
    lw, lh = slide.info.level_dimensions[level]
    assert grid.level == level and grid.level_downsample == (w0 / lw, h0 / lh)
    assert grid.read_size == (224, 224)
    patch0 = grid.patch_size_level0
    scale = patch0 / 224
    for mx, my, _ in ODD_MARKERS:
        hit = (grid.coords <= (mx, my)).all(axis=1) & (grid.coords + patch0 > (mx, my)).all(axis=1)
        i = int(np.flatnonzero(hit)[0])
        x, y = (int(v) for v in grid.coords[i])
        patch = read_patches(slide, grid, [i])[0]
        dsx, dsy = grid.level_downsample
        region = slide.read_level(level=level, x=round(x / dsx), y=round(y / dsy), width=224, height=224)
        np.testing.assert_array_equal(patch, resize_patch(region, size=224))
        ref = resize_patch(slide.read_level(level=0, x=x, y=y, width=patch0, height=patch0), size=224)
        assert np.abs(patch.astype(int) - ref.astype(int)).mean() < 6.0
        left, top = _green_edges(patch)
        assert abs(left - (mx - x) / scale) <= 1.0 and abs(top - (my - y) / scale) <= 1.0


def test_cmu_tissue_and_grids(cmu_slide_path):
    with open_slide(cmu_slide_path) as slide:
        tissue = require_tissue(detect_tissue(slide))
        assert 0.2 < tissue.mask.mean() < 0.6  # the section covers about a third of the crop
        assert tissue.level0_size == (2220, 2967) and len(tissue.outer) >= 1
        grids = {}
        for mag, mpp, patch0, count in (("10x", 1.0, 449, (8, 20)), ("20x", 0.5, 224, (35, 80))):
            grid = make_grid(slide, target_mpp=mpp, tissue=tissue)
            grids[mag] = grid
            assert grid.magnification == mag and grid.level == 0 and not grid.upsampled
            assert grid.patch_size_level0 == patch0 == round(224 * mpp / 0.499)
            assert count[0] <= len(grid) <= count[1]
            assert (grid.coords % patch0 == 0).all()
            assert (grid.coords >= 0).all() and (grid.coords + patch0 <= (2220, 2967)).all()
            # kept patches cover about the tissue area (borders add a little)
            covered = len(grid) * patch0**2 / (tissue.mask.mean() * 2220 * 2967)
            assert 0.8 < covered < 1.6
        # the two magnifications agree on where the tissue is: each 10x patch overlaps 20x ones
        g10, g20 = grids["10x"], grids["20x"]
        for x, y in g10.coords:
            overlap = (np.abs(g20.coords[:, 0] + 112 - (x + 224)) < 336) & (np.abs(g20.coords[:, 1] + 112 - (y + 224)) < 336)
            assert overlap.any()
        # best level is 0 at both magnifications: a patch is the level-0 box resized
        x, y = (int(v) for v in g10.coords[-1])
        ref = resize_patch(slide.read_level(level=0, x=x, y=y, width=449, height=449), size=224)
        np.testing.assert_array_equal(read_patches(slide, g10, [len(g10) - 1])[0], ref)
        x, y = (int(v) for v in g20.coords[-1])
        ref = slide.read_level(level=0, x=x, y=y, width=224, height=224)
        np.testing.assert_array_equal(read_patches(slide, g20, [len(g20) - 1])[0], ref)
        got = np.concatenate([b for _, b in iter_patch_batches(slide, g10, batch_size=4, num_workers=2)])
        assert got.shape == (len(g10), 224, 224, 3)
        np.testing.assert_array_equal(got, read_patches(slide, g10, np.arange(len(g10))))
        # tissue patches are stained, not glass: mean saturation well above background
        rgb = got.astype(float)
        sat = (rgb.max(-1) - rgb.min(-1)) / np.maximum(rgb.max(-1), 1)
        assert sat.mean() > 0.15


def _write_plain_tiff(path, *, with_resolution: bool, size=(900, 700)) -> None:
    """A single-level tiled RGB TIFF with a pink block, optionally without resolution tags."""
    w, h = size
    img = np.full((h, w, 3), 240, np.uint8)
    img[100:600, 150:700] = (200, 110, 170)
    kwargs = {"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"} if with_resolution else {}
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", **kwargs)


def test_unknown_mpp_file_needs_override(tmp_path):
    path = tmp_path / "nompp.tif"
    _write_plain_tiff(path, with_resolution=False)
    with open_slide(path) as slide:
        assert slide.info.mpp is None
        with pytest.warns(DismmWarning):
            tissue = detect_tissue(slide)
        with pytest.raises(UnknownMppError, match="--mpp"):
            make_grid(slide, target_mpp=1.0, tissue=tissue)
    with open_slide(path, mpp=0.5) as slide:
        grid = make_grid(slide, target_mpp=1.0, tissue=detect_tissue(slide))
        assert len(grid) >= 1 and grid.patch_size_level0 == 448


def test_coarse_scan_upsamples_with_warning(tmp_path):
    path = tmp_path / "coarse.tif"
    _write_plain_tiff(path, with_resolution=True)  # 2e4 px/cm = 0.5 µm/px
    with open_slide(path, mpp=1.0) as slide:
        tissue = detect_tissue(slide)
        with pytest.warns(DismmWarning, match="coarser"):
            grid = make_grid(slide, target_mpp=0.5, tissue=tissue)
        assert grid.upsampled and grid.read_size == (112, 112) and len(grid) > 0
        patches = read_patches(slide, grid, [0])
        assert patches.shape == (1, 224, 224, 3)
    with open_slide(path) as slide:
        assert slide.info.mpp == pytest.approx(0.5)


def test_small_sample_slide_is_smaller_than_a_patch(tmp_path):
    truth = write_sample_slide(tmp_path / "small.tif", width=400, height=320, mpp=0.5, tile=128, n_levels=1)
    with open_slide(truth.path) as slide:
        tissue = detect_tissue(slide)
        grid = make_grid(slide, target_mpp=0.5, tissue=tissue)  # one 224 px patch fits
        assert grid.patch_size_level0 == 224
        with pytest.raises(SlideError, match="smaller than one 224 px patch"):
            make_grid(slide, target_mpp=1.0, tissue=tissue)
