"""Opening and browsing a 100 000 x 80 000 px slide keeps resident memory small."""

from __future__ import annotations

import gc

import numpy as np
import psutil
import pytest

from napari_dismm.slide import open_slide
from tests.slide_fixtures import BIG_SIZE, big_slide, odd_slide_zlib  # noqa: F401

pytestmark = pytest.mark.slow


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def test_browsing_big_slide_keeps_rss_low(big_slide, odd_slide_zlib):
    with open_slide(odd_slide_zlib.path) as warm:  # import zarr/tifffile/openslide first
        warm.pyramid[0][:512, :512]
    before = _rss_mb()
    rng = np.random.default_rng(0)
    peak = before
    with open_slide(big_slide.path) as slide:
        assert slide.info.dimensions == BIG_SIZE
        assert slide.info.level_count >= 7
        # the tissue lies inside the layout's ellipses; browse there and in empty glass
        cx, cy = (int(v) for v in big_slide.layout.ellipses[0, :2])
        for level, arr in enumerate(slide.pyramid):
            ds = slide.info.level_downsamples[level]
            ch, cw = arr.chunks[:2]
            h, w = arr.shape[:2]
            for k in range(12):  # 12 viewports of 2 x 2 chunks per level, like panning in napari
                if k % 2 == 0:
                    x, y = int(cx / ds) + int(rng.integers(-2, 2)) * cw, int(cy / ds) + int(rng.integers(-2, 2)) * ch
                else:
                    x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
                x, y = max(0, min(x - x % cw, w - 1)), max(0, min(y - y % ch, h - 1))
                view = arr[y : y + 2 * ch, x : x + 2 * cw]
                assert view.dtype == np.uint8 and view.ndim == 3
            peak = max(peak, _rss_mb())
        thumb = slide.thumbnail(max_size=1024)
        assert max(thumb.shape[:2]) == 1024
        peak = max(peak, _rss_mb())
    growth = peak - before
    print(f"RSS before {before:.0f} MB, peak growth {growth:.0f} MB")
    assert growth < 300, f"resident memory grew by {growth:.0f} MB"
