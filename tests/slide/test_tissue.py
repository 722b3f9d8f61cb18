"""Tissue detection on generated RGB images with a known layout."""

import numpy as np
import pytest

from napari_dismm.errors import DismmWarning, SlideError
from napari_dismm.tissue import TissueParams, detect_tissue, require_tissue

PINK = (205, 120, 175)
PURPLE = (120, 80, 160)
WHITE = (238, 238, 236)


def _canvas(h: int, w: int, colour, *, noise: float = 3.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.float32)
    img[:] = colour
    img += rng.normal(0, noise, img.shape)
    return img


def _finish(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _exact_fraction(mask: np.ndarray, ds: tuple[float, float], box) -> float:
    """Independent reference: per-pixel overlap lengths of the box with every mask cell."""
    x0, y0, w, h = box
    dx, dy = ds
    cols = np.arange(mask.shape[1])
    rows = np.arange(mask.shape[0])
    ox = np.clip(np.minimum(x0 + w, (cols + 1) * dx) - np.maximum(x0, cols * dx), 0, None)
    oy = np.clip(np.minimum(y0 + h, (rows + 1) * dy) - np.maximum(y0, rows * dy), 0, None)
    return float(oy @ mask.astype(float) @ ox) / (w * h)


@pytest.fixture(scope="module")
def planted():
    """300 x 400 image at 8 µm/px: two tissue rectangles (one with a big hole), a speck,
    a small hole, and the label map of what is tissue."""
    img = _canvas(300, 400, WHITE)
    truth = np.zeros((300, 400), bool)
    img[40:200, 30:180] = PINK + np.random.default_rng(1).normal(0, 6, (160, 150, 3))
    truth[40:200, 30:180] = True
    img[90:130, 80:130] = WHITE  # big hole: 40 x 50 px = 128 000 µm² -> kept as a hole
    truth[90:130, 80:130] = False
    img[160:163, 150:153] = WHITE  # tiny hole: 9 px = 576 µm² -> filled
    img[100:260, 250:370] = PURPLE
    truth[100:260, 250:370] = True
    img[20:23, 300:303] = PURPLE  # speck: 9 px -> removed
    return _finish(img), truth


def test_mask_matches_planted_layout(planted):
    img, truth = planted
    tm = detect_tissue(img, mpp=8.0)
    assert tm.mask.shape == truth.shape
    assert tm.downsample == (1.0, 1.0)
    inter = np.logical_and(tm.mask, truth).sum()
    union = np.logical_or(tm.mask, truth).sum()
    assert inter / union > 0.95
    assert not tm.mask[20:23, 300:303].any(), "speck below min area must be removed"
    assert tm.mask[160:163, 150:153].all(), "small hole must be filled"
    assert not tm.mask[95:125, 85:125].any(), "large hole must stay background"


def test_contours_outer_and_holes_in_level0_coordinates(planted):
    img, _ = planted
    # pretend the image is a 4x-reduced view of a 1600 x 1200 level 0 at 2 µm/px
    tm = detect_tissue(img, mpp=2.0, level0_size=(1600, 1200))
    assert tm.downsample == (4.0, 4.0)
    assert len(tm.outer) == 2
    assert len(tm.holes) == 1
    boxes = sorted((c[:, 0].min(), c[:, 1].min(), c[:, 0].max(), c[:, 1].max()) for c in tm.outer)
    # first rectangle: columns 30..179, rows 40..199 in the image -> x 120..720, y 160..800
    np.testing.assert_allclose(boxes[0], (120, 160, 720, 800), atol=4 * 2.5)
    np.testing.assert_allclose(boxes[1], (1000, 400, 1480, 1040), atol=4 * 2.5)
    hole = tm.holes[0]
    np.testing.assert_allclose(
        (hole[:, 0].min(), hole[:, 1].min(), hole[:, 0].max(), hole[:, 1].max()),
        (320, 360, 520, 520),
        atol=4 * 2.5,
    )
    for c in tm.contours:
        np.testing.assert_array_equal(c.xy[0], c.xy[-1])  # closed


def test_fraction_in_matches_independent_reference(planted):
    img, _ = planted
    tm = detect_tissue(img, mpp=2.0, level0_size=(1601, 1203))  # non-integer downsample
    dx, dy = tm.downsample
    assert dx == pytest.approx(1601 / 400) and dy == pytest.approx(1203 / 300)
    rng = np.random.default_rng(3)
    boxes = np.column_stack(
        [rng.uniform(-100, 1600, 200), rng.uniform(-100, 1200, 200), rng.uniform(1, 500, 200), rng.uniform(1, 500, 200)]
    )
    got = tm.fractions_in(boxes)
    want = [_exact_fraction(tm.mask, tm.downsample, b) for b in boxes]
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert tm.fraction_in(*boxes[0]) == pytest.approx(want[0], abs=1e-9)
    assert tm.fraction_in(140, 180, 100, 100) == pytest.approx(1.0)  # inside rectangle 1
    assert tm.fraction_in(0, 0, 100, 100) == 0.0  # background corner
    assert tm.fraction_in(5000, 5000, 100, 100) == 0.0  # outside the slide


def test_black_background_is_not_tissue():
    img = _canvas(200, 200, (6, 4, 8), noise=3.0)
    img[50:150, 50:150] = PINK
    tm = detect_tissue(_finish(img), mpp=8.0)
    assert tm.mask[60:140, 60:140].all()
    assert tm.mask.sum() == pytest.approx(100 * 100, rel=0.05)
    assert not tm.mask[:40].any()


def test_blank_slide_gives_empty_mask_and_clear_error():
    tm = detect_tissue(_finish(_canvas(200, 300, WHITE)), mpp=8.0)
    assert tm.empty and tm.contours == ()
    assert tm.fraction_in(0, 0, 300, 200) == 0.0
    with pytest.raises(SlideError, match="no tissue found in <slide>"):
        require_tissue(tm)


def test_fixed_threshold_and_min_area_are_honoured(planted):
    img, _ = planted
    # a threshold above every pixel's saturation finds nothing
    assert detect_tissue(img, mpp=8.0, params=TissueParams(saturation_threshold=0.99)).empty
    # purple: 160 x 120 px; pink: 160 x 150 px less its 40 x 50 hole; at 64 µm² per px
    big = TissueParams(min_area_um2=20_000 * 64)
    tm = detect_tissue(img, mpp=8.0, params=big)
    assert tm.mask[50:60, 40:60].all() and not tm.mask[150:200, 280:340].any()
    assert require_tissue(tm) is tm


def test_unknown_mpp_warns_and_still_detects(planted):
    img, truth = planted
    with pytest.warns(DismmWarning, match="mpp unknown"):
        tm = detect_tissue(img)
    assert np.logical_and(tm.mask, truth).sum() > 0.9 * truth.sum()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mask_mpp": 0.0},
        {"sigma_um": -1.0},
        {"saturation_threshold": 1.5},
        {"min_area_um2": -5.0},
        {"dark_value": 1.0},
        {"max_size": 8},
        {"mask_mpp": float("nan")},
    ],
)
def test_params_bounds(kwargs):
    with pytest.raises(SlideError, match=next(iter(kwargs))):
        TissueParams(**kwargs)


def test_bad_image_rejected():
    with pytest.raises(SlideError, match="RGB"):
        detect_tissue(np.zeros((10, 10), np.uint8), mpp=1.0)
    with pytest.raises(SlideError, match="uint8"):
        detect_tissue(np.zeros((10, 10, 3), np.float32), mpp=1.0)
