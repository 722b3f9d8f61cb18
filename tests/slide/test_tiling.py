"""Patch grids and patch reads on in-memory pyramids with a known tissue layout.

`ArraySlide` implements the slide API (info, read_level, thumbnail) over numpy arrays, so
pyramids with odd sizes, non-power-of-two factors, coarse or unknown mpp are cheap to make.
The same checks on real files written by the slide layer are in test_tiling_files.py.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from napari_dismm.errors import DismmWarning, SlideError, UnknownMppError
from napari_dismm.tiling import (
    best_read_level,
    iter_patch_batches,
    level_downsample,
    magnification_label,
    magnification_to_mpp,
    make_grid,
    read_patches,
    read_region_of,
    resize_patch,
)
from napari_dismm.tissue import detect_tissue, require_tissue
from tests.slide.test_tissue import _exact_fraction

BACKGROUND = (242, 242, 240)


@dataclass(frozen=True)
class FakeInfo:
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    slide_id: str
    background: tuple[int, int, int] = BACKGROUND
    mpp_source: str = "user"


class ArraySlide:
    """A pyramid of numpy arrays: level k is level k-1 block-averaged by ``factor``, sizes
    rounded down (the overhang dropped), as scanners and our sample-slide writer do."""

    def __init__(self, level0: np.ndarray, *, mpp: float | None, factor: int = 2, levels: int = 3, slide_id="fake"):
        self.levels = [level0]
        for _ in range(1, levels):
            prev = self.levels[-1]
            h, w = (prev.shape[0] // factor) * factor, (prev.shape[1] // factor) * factor
            blocks = prev[:h, :w].reshape(h // factor, factor, w // factor, factor, 3)
            total = blocks.sum(axis=(1, 3), dtype=np.uint32)
            n = factor * factor
            self.levels.append(((total + n // 2) // n).astype(np.uint8))
        dims = tuple((a.shape[1], a.shape[0]) for a in self.levels)
        w0, h0 = dims[0]
        ds = tuple((w0 / w + h0 / h) / 2 for w, h in dims)
        self.info = FakeInfo(level_dimensions=dims, level_downsamples=ds, mpp=mpp, slide_id=slide_id)
        self.reads = 0

    def read_level(self, *, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        self.reads += 1
        arr = self.levels[level]
        out = np.empty((height, width, 3), np.uint8)
        out[:] = BACKGROUND
        xs, ys = max(x, 0), max(y, 0)
        xe, ye = min(x + width, arr.shape[1]), min(y + height, arr.shape[0])
        if xe > xs and ye > ys:
            out[ys - y : ye - y, xs - x : xe - x] = arr[ys:ye, xs:xe]
        return out

    def thumbnail(self, *, max_size: int = 1024) -> np.ndarray:
        from PIL import Image

        h, w = self.levels[0].shape[:2]
        scale = min(1.0, max_size / max(w, h))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return np.asarray(Image.fromarray(self.levels[0]).resize(size, Image.Resampling.BOX))


def textured_slide(
    width: int, height: int, rects: list[tuple[int, int, int, int]], *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 RGB with H&E-like textured tissue in ``rects`` (x, y, w, h) on plain glass,
    and the boolean level-0 truth. The texture (periods 30-120 px) makes shifts visible."""
    rng = np.random.default_rng(seed)
    x = np.arange(width, dtype=np.float32)
    y = np.arange(height, dtype=np.float32)
    rows, cols = [], []
    for _ in range(6):
        k = 2 * np.pi / rng.uniform(30, 120)
        angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        ax, ay = k * np.cos(angle), k * np.sin(angle)
        # sin(ax x + ay y + p) = cos(ay y + p) sin(ax x) + sin(ay y + p) cos(ax x): one matmul
        rows += [np.cos(ay * y + phase), np.sin(ay * y + phase)]
        cols += [np.sin(ax * x), np.cos(ax * x)]
    tex = np.stack(rows, axis=1) @ np.stack(cols, axis=0)
    tex /= 6
    truth = np.zeros((height, width), bool)
    for x0, y0, w, h in rects:
        truth[y0 : y0 + h, x0 : x0 + w] = True
    # colour through a lookup table on the quantised texture (cheap on a 10 Mpx image)
    levels = np.linspace(-1, 1, 256, dtype=np.float32)[:, None]
    lut = np.rint(np.array([190, 110, 170]) + np.array([40, 50, 30]) * levels).astype(np.uint8)
    q = np.rint((np.clip(tex, -1, 1) + 1) * 127.5).astype(np.uint8)
    img = lut[q]
    img[~truth] = BACKGROUND
    return img, truth


RECTS = [(200, 150, 1700, 1800), (2300, 500, 1285, 2100)]  # the second touches the right edge


@pytest.fixture(scope="module")
def layout():
    return textured_slide(3585, 2691, RECTS)  # odd sizes: reduced levels are rounded up


@pytest.fixture(scope="module")
def slide(layout):
    return ArraySlide(layout[0], mpp=0.25, factor=2, levels=4, slide_id="odd-pyramid")


@pytest.fixture(scope="module")
def tissue(slide):
    return detect_tissue(slide)


def _fully_inside(truth: np.ndarray, x: int, y: int, size: int) -> bool:
    return bool(truth[y : y + size, x : x + size].all())


@pytest.mark.parametrize("target_mpp, patch0, min_background", [(1.0, 896, 0), (0.5, 448, 3)])
def test_grid_on_known_layout(slide, tissue, layout, target_mpp, patch0, min_background):
    truth = layout[1]
    grid = make_grid(slide, target_mpp=target_mpp, tissue=tissue, min_tissue=0.25)
    assert grid.patch_size_level0 == patch0 and grid.step_level0 == patch0
    assert grid.coords.dtype == np.int64 and grid.coords.shape == (len(grid), 2)
    assert len(grid) > 0
    assert (grid.coords % patch0 == 0).all(), "corners must be multiples of the level-0 step"
    w0, h0 = slide.info.level_dimensions[0]
    assert (grid.coords >= 0).all()
    assert (grid.coords[:, 0] + patch0 <= w0).all() and (grid.coords[:, 1] + patch0 <= h0).all()

    kept = {tuple(c) for c in grid.coords.tolist()}
    inside = background = 0
    for y in range(0, h0 - patch0 + 1, patch0):
        for x in range(0, w0 - patch0 + 1, patch0):
            if _fully_inside(truth, x, y, patch0):
                inside += 1
                assert (x, y) in kept, f"patch at {(x, y)} lies inside planted tissue"
            if not truth[y : y + patch0, x : x + patch0].any():
                background += 1
                assert (x, y) not in kept, f"patch at {(x, y)} is pure background"
    assert inside >= 2 and background >= min_background  # the layout exercises both cases

    # every kept patch meets the threshold, recomputed independently from the mask
    ref = np.array([_exact_fraction(tissue.mask, tissue.downsample, (x, y, patch0, patch0)) for x, y in grid.coords])
    np.testing.assert_allclose(grid.tissue_fraction, ref, atol=1e-5)
    assert (ref >= 0.25 - 1e-9).all()


@pytest.mark.parametrize("target_mpp, overlap", [(0.5, 0), (0.5, 56), (1.0, 0)])
def test_strip_reads_equal_per_patch_reads(slide, tissue, target_mpp, overlap):
    """read_patches reads row neighbours as one strip: same pixels, fewer backend reads."""
    grid = make_grid(slide, target_mpp=target_mpp, overlap=overlap, tissue=tissue)
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.permutation(len(grid)), [0, 0, len(grid) - 1]])  # any order, repeats
    before = slide.reads
    got = read_patches(slide, grid, idx)
    strip_reads = slide.reads - before
    for row, i in enumerate(idx):
        np.testing.assert_array_equal(got[row], resize_patch(read_region_of(slide, grid, int(i)), size=224))
    assert strip_reads < len(idx) / 2


def test_overlap_keeps_integer_step(slide, tissue):
    grid = make_grid(slide, target_mpp=0.5, overlap=56, tissue=tissue)
    assert grid.patch_size_level0 == 448 and grid.step_level0 == 448 - 112
    assert (grid.coords % grid.step_level0 == 0).all()


def test_reduced_level_read_matches_level0_without_drift(slide, tissue):
    """0.25 µm/px, 10x: level 2 (896 x 672 of 3585 x 2691, ds ~4.001 / 4.004) is read."""
    grid = make_grid(slide, target_mpp=1.0, tissue=tissue)
    assert grid.level == 2
    assert grid.level_downsample == (3585 / 896, 2691 / 672) and grid.read_size == (224, 224)
    far = np.argsort(grid.coords.sum(axis=1))[-3:]  # farthest from the origin
    patches = read_patches(slide, grid, far)
    assert patches.shape == (3, 224, 224, 3) and patches.dtype == np.uint8
    for patch, (x, y) in zip(patches, grid.coords[far]):
        dsx, dsy = grid.level_downsample
        region = slide.read_level(level=2, x=round(x / dsx), y=round(y / dsy), width=224, height=224)
        np.testing.assert_array_equal(patch, resize_patch(region, size=224))
        ref = resize_patch(slide.read_level(level=0, x=x, y=y, width=896, height=896), size=224)
        diff = np.abs(patch.astype(int) - ref.astype(int)).mean()
        assert diff < 1.0
        # the tolerance can fail: the same comparison against a box shifted by 8 level-0 px
        shifted = resize_patch(slide.read_level(level=0, x=x + 8, y=y, width=896, height=896), size=224)
        assert np.abs(patch.astype(int) - shifted.astype(int)).mean() > 3 * max(diff, 0.5)


def test_best_level_zero_read_equals_resized_level0(layout):
    """0.3 µm/px at 20x: level 1 (ds 2) is too coarse, so level 0 is read (373 px) and resized."""
    img, _ = layout
    s = ArraySlide(img, mpp=0.3, levels=3)
    tm = detect_tissue(s)
    grid = make_grid(s, target_mpp=0.5, tissue=tm)
    assert grid.level == 0 and grid.patch_size_level0 == round(224 * 0.5 / 0.3) == 373
    assert grid.read_size == (373, 373)
    idx = [0, len(grid) // 2, len(grid) - 1]
    for patch, (x, y) in zip(read_patches(s, grid, idx), grid.coords[idx]):
        region = s.read_level(level=0, x=int(x), y=int(y), width=373, height=373)
        np.testing.assert_array_equal(patch, resize_patch(region, size=224))


def test_native_20x_reads_level0_unresized(layout):
    img, _ = layout
    s = ArraySlide(img, mpp=0.5, levels=2)
    grid = make_grid(s, target_mpp=0.5, tissue=detect_tissue(s))
    assert grid.level == 0 and grid.read_size == (224, 224) and not grid.upsampled
    x, y = grid.coords[-1]
    np.testing.assert_array_equal(
        read_patches(s, grid, [len(grid) - 1])[0], s.read_level(level=0, x=int(x), y=int(y), width=224, height=224)
    )


def test_factor3_pyramid_uses_nearest_finer_level(layout):
    """Levels at ds ~1, 3, 9: 10x of a 0.25 µm/px slide (ds 4) reads level 1 (299 px -> 224)."""
    img, _ = layout
    s = ArraySlide(img, mpp=0.25, factor=3, levels=3)
    grid = make_grid(s, target_mpp=1.0, tissue=detect_tissue(s))
    assert grid.level == 1 and grid.level_downsample == pytest.approx((3.0, 3.0), abs=0.01)
    assert grid.read_size == (299, 299)
    i = int(np.argmax(grid.coords.sum(axis=1)))
    x, y = grid.coords[i]
    patch = read_patches(s, grid, [i])[0]
    ref = resize_patch(s.read_level(level=0, x=int(x), y=int(y), width=896, height=896), size=224)
    assert np.abs(patch.astype(int) - ref.astype(int)).mean() < 2.0


def test_coarser_native_resolution_upsamples_and_warns(layout):
    img, _ = layout
    small = img[::4, ::4].copy()  # pretend a 1.0 µm/px scan
    s = ArraySlide(small, mpp=1.0, levels=1)
    with pytest.warns(DismmWarning, match="coarser than the requested"):
        grid = make_grid(s, target_mpp=0.5, tissue=detect_tissue(s))
    assert grid.upsampled and grid.patch_size_level0 == 112 and grid.read_size == (112, 112)
    assert grid.magnification == "20x"
    x, y = grid.coords[0]
    patch = read_patches(s, grid, [0])[0]
    assert patch.shape == (224, 224, 3)
    np.testing.assert_array_equal(
        patch, resize_patch(s.read_level(level=0, x=int(x), y=int(y), width=112, height=112), size=224)
    )


def test_unknown_mpp_is_a_clear_error(layout):
    s = ArraySlide(layout[0][:600, :600], mpp=None, levels=1, slide_id="nompp")
    with pytest.warns(DismmWarning):
        tm = detect_tissue(s)
    with pytest.raises(UnknownMppError, match="nompp.*--mpp"):
        make_grid(s, target_mpp=1.0, tissue=tm)


def test_slide_smaller_than_one_patch(layout):
    s = ArraySlide(layout[0][:400, :1000], mpp=0.5, levels=1, slide_id="tiny")
    tm = detect_tissue(s)
    make_grid(s, target_mpp=0.5, tissue=tm)  # 224 px fits
    with pytest.raises(SlideError, match="tiny.*smaller than one 224 px patch"):
        make_grid(s, target_mpp=1.0, tissue=tm)  # 448 px does not


def test_empty_tissue_gives_empty_grid():
    blank = np.full((1200, 1500, 3), BACKGROUND, np.uint8)
    s = ArraySlide(blank, mpp=0.5, levels=2, slide_id="blank-slide")
    tm = detect_tissue(s)
    grid = make_grid(s, target_mpp=1.0, tissue=tm, min_tissue=0.0)
    assert len(grid) == 0 and grid.coords.shape == (0, 2) and grid.tissue_fraction.shape == (0,)
    assert read_patches(s, grid, []).shape == (0, 224, 224, 3)
    assert list(iter_patch_batches(s, grid)) == []
    with pytest.raises(SlideError, match="no tissue found in blank-slide"):
        require_tissue(tm)


def test_mask_of_another_slide_and_bad_arguments(slide, tissue, layout):
    other = ArraySlide(layout[0][:2000, :2000], mpp=0.25, levels=1)
    with pytest.raises(SlideError, match="tissue mask was made for"):
        make_grid(other, target_mpp=1.0, tissue=tissue)
    for kwargs in ({"target_mpp": 0.0}, {"target_mpp": 1.0, "min_tissue": 1.5}, {"target_mpp": 1.0, "overlap": 224}):
        with pytest.raises(SlideError):
            make_grid(slide, tissue=tissue, **kwargs)


def test_level_geometry_helpers():
    dims = [(4001, 3003), (2000, 1501), (1000, 750), (500, 375)]
    assert level_downsample(dims, 0) == (1.0, 1.0)
    assert level_downsample(dims, 2) == (4001 / 1000, 3003 / 750)
    assert best_read_level(dims, 4.0) == 2  # 4.004 is within 1 %
    assert best_read_level(dims, 3.99) == 2  # within 1 %
    assert best_read_level(dims, 3.9) == 1
    assert best_read_level(dims, 0.5) == 0
    assert level_downsample([(1000, 900), (400, 360)], 1) == (2.5, 2.5)
    assert best_read_level([(1000, 900), (400, 360)], 2.4) == 0


@pytest.mark.parametrize("text, mpp", [("10x", 1.0), ("20x", 0.5), ("10", 1.0), (10, 1.0), (20.0, 0.5), ("40X", 0.25), (" 20 ", 0.5)])
def test_magnification_to_mpp(text, mpp):
    assert magnification_to_mpp(text) == pytest.approx(mpp)


@pytest.mark.parametrize("bad", ["ten", "", "0x", -10, "x", float("nan")])
def test_magnification_to_mpp_rejects(bad):
    with pytest.raises(SlideError, match="magnification"):
        magnification_to_mpp(bad)


def test_magnification_label():
    assert magnification_label(1.0) == "10x" and magnification_label(0.5) == "20x"
    assert magnification_label(0.499) == "20x" and magnification_label(0.25) == "40x"
    assert magnification_label(3.0) == "3.33x" and magnification_label(4.0) == "2.5x"


# -- prefetching iterator -------------------------------------------------------------------


class SlowSlide:
    """Wraps a slide: reads take a little time, count themselves, and reads covering one
    chosen level column fail."""

    def __init__(self, inner: ArraySlide, *, fail_at_x: int | None = None, delay: float = 0.002):
        self.inner, self.info = inner, inner.info
        self.fail_at_x, self.delay = fail_at_x, delay
        self.reads = 0
        self.lock = threading.Lock()

    def read_level(self, **kwargs):
        time.sleep(self.delay)
        x, width = kwargs["x"], kwargs["width"]
        if self.fail_at_x is not None and x <= self.fail_at_x < x + width:
            raise OSError("simulated unreadable tile")
        with self.lock:
            self.reads += 1
        return self.inner.read_level(**kwargs)


@pytest.fixture(scope="module")
def grid20(slide, tissue):
    return make_grid(slide, target_mpp=0.5, tissue=tissue)


def test_prefetch_preserves_order_and_content(slide, grid20):
    expected = read_patches(slide, grid20, np.arange(len(grid20)))
    got_idx, got = [], []
    for idx, batch in iter_patch_batches(slide, grid20, batch_size=5, num_workers=2):
        assert batch.shape == (len(idx), 224, 224, 3) and batch.dtype == np.uint8
        got_idx.append(idx)
        got.append(batch)
    np.testing.assert_array_equal(np.concatenate(got_idx), np.arange(len(grid20)))
    np.testing.assert_array_equal(np.concatenate(got), expected)
    sub = np.array([7, 3, 11, 0])
    serial = list(iter_patch_batches(slide, grid20, batch_size=3, num_workers=0, indices=sub))
    np.testing.assert_array_equal(np.concatenate([b for _, b in serial]), expected[sub])


def test_prefetch_propagates_reader_exceptions(slide, grid20):
    bad_x = round(grid20.coords[len(grid20) // 2, 0] / grid20.level_downsample[0])
    s = SlowSlide(slide, fail_at_x=bad_x)
    seen = 0
    with pytest.raises(OSError, match="simulated unreadable tile"):
        for idx, _ in iter_patch_batches(s, grid20, batch_size=4, num_workers=2):
            seen += len(idx)
    assert seen < len(grid20)


def test_prefetch_early_stop_does_not_hang_and_stays_bounded(slide, grid20):
    s = SlowSlide(slide, delay=0.01)
    threads_before = threading.active_count()
    start = time.perf_counter()
    it = iter_patch_batches(s, grid20, batch_size=2, num_workers=2, prefetch=3)
    first_idx, _ = next(it)
    it.close()
    elapsed = time.perf_counter() - start
    reads_at_close = s.reads
    time.sleep(0.1)
    assert s.reads == reads_at_close, "no reads may continue after close()"
    # first batch + at most `prefetch` batches in flight, each of 2 patches
    assert reads_at_close <= 2 * (1 + 3)
    assert len(grid20) > 2 * (1 + 3) + 4
    assert elapsed < 5.0
    assert threading.active_count() <= threads_before
    np.testing.assert_array_equal(first_idx, [0, 1])


def test_prefetch_overlaps_reading_with_consumer(slide, grid20):
    """With reads and consumer work of similar cost, prefetching hides most of the reading."""
    s = SlowSlide(slide, delay=0.01)
    n = 8 * 4
    indices = np.arange(min(n, len(grid20)))

    def run(workers: int) -> float:
        start = time.perf_counter()
        for _ in iter_patch_batches(s, grid20, batch_size=4, num_workers=workers, indices=indices):
            time.sleep(0.04)  # consumer (encoder) work per batch ~ the reading time
        return time.perf_counter() - start

    serial, threaded = run(0), run(2)
    assert threaded < 0.8 * serial
