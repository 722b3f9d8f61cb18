"""Region prediction on the real CMU slide: with an overlap the maps come from the
overlapping grid inside the region while the prediction stays the plain region bag's, and
cached whole-slide features are reused (no patch encoded)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_dismm import region as region_module
from napari_dismm.predict import predict_slide
from napari_dismm.region import predict_region

# level-0 (x, y) of a square on the CMU slide's tissue, 0.499 µm/px: ~0.45 x 0.45 mm
SQUARE = [[(900.0, 1300.0), (1800.0, 1300.0), (1800.0, 2200.0), (900.0, 2200.0)]]


@pytest.fixture
def encoded(monkeypatch):
    seen: list[np.ndarray] = []
    real = region_module.encode_grid

    def spy(slide, grid, encoder, **kwargs):
        seen.append(grid.coords.copy())
        return real(slide, grid, encoder, **kwargs)

    monkeypatch.setattr(region_module, "encode_grid", spy)
    return seen


def _centres_inside(patches) -> bool:
    cx, cy = patches.x + patches.width / 2, patches.y + patches.height / 2
    (x0, y0), (x1, y1) = SQUARE[0][0], SQUARE[0][2]
    return bool(((cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)).all())


def test_region_overlap_maps_on_the_finer_grid_prediction_from_the_plain_bag(cmu_slide_path, tmp_path, encoded):
    common = {"slide_path": cmu_slide_path, "model_dir": "demo", "region": SQUARE, "device": "cpu",
              "features_dir": tmp_path / "features"}
    plain = predict_region(**common)
    fine = predict_region(**common, overlap=0.5)
    assert fine.scope["overlap"] == 0.5 and fine.scope["bag"] == "grid" and fine.scope["stride_px"] == 112
    assert fine.scope["bag_patches"] == len(plain.patches) == fine.scope["region_patches"]
    assert fine.scope["map_patches"] == len(fine.patches) > 2 * len(plain.patches)
    assert _centres_inside(plain.patches) and _centres_inside(fine.patches)
    # the model's answer is the plain region bag's; the map rows lie on the half-patch lattice
    np.testing.assert_allclose(fine.probabilities, plain.probabilities, atol=1e-6)
    for _mag, rows in fine.patches.groupby("magnification"):
        half = rows.width.iloc[0] / 2
        for axis in (rows.x, rows.y):
            assert abs(np.diff(np.unique(axis)).min() - half) <= 1  # stride = half a patch (level-0 rounding)
    from napari_dismm.fine_maps import scope_text

    text = scope_text(fine.scope)
    assert "drawn region only" in text and "overlap 0.5" in text


def test_region_reuses_the_whole_slide_features(cmu_slide_path, tmp_path, encoded):
    features = tmp_path / "features"
    whole = predict_slide(slide_path=cmu_slide_path, model_dir="demo", device="cpu", features_dir=features)
    part = predict_region(slide_path=cmu_slide_path, model_dir="demo", region=SQUARE, device="cpu",
                          features_dir=features)
    assert encoded == []  # every region patch came from the cached whole-slide features
    assert part.timings["features_reused"] == 1.0
    keys = {(r.x, r.y, r.magnification) for r in whole.patches.itertuples()}
    assert {(r.x, r.y, r.magnification) for r in part.patches.itertuples()} <= keys
