"""The sample-slide generator: planted layout recorded and visible in the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from napari_dismm.slide import load_sample_slide, open_slide, sample_slide_path
from napari_dismm.slide.synthetic import CLASS_NAMES, sidecar_path
from tests.slide_fixtures import odd_slide_zlib  # noqa: F401


def test_sidecar_roundtrip_and_label_map(odd_slide_zlib):
    assert sidecar_path(odd_slide_zlib.path).exists()
    again = load_sample_slide(odd_slide_zlib.path)
    np.testing.assert_array_equal(again.label_map, odd_slide_zlib.label_map)
    assert again.class_names == CLASS_NAMES == ("background", "tumor", "stroma", "immune")
    lm, ds = again.label_map, again.label_downsample
    w, h = again.dimensions
    assert lm.shape == (-(-h // ds), -(-w // ds)) and lm.dtype == np.uint8
    assert set(np.unique(lm)) == {0, 1, 2, 3}  # every class planted
    # labels_at agrees with the map at the map's cell centres
    ys, xs = np.nonzero(lm >= 0)
    pick = np.random.default_rng(0).choice(len(xs), 500, replace=False)
    got = again.labels_at((xs[pick] + 0.5) * ds, (ys[pick] + 0.5) * ds)
    np.testing.assert_array_equal(got, lm[ys[pick], xs[pick]])
    mask = again.region_mask("tumor", ds)
    np.testing.assert_array_equal(mask, lm == 1)
    with pytest.raises(Exception, match="unknown class"):
        again.region_mask("bone", 8)


def test_planted_classes_look_different(odd_slide_zlib):
    """Tumor and immune regions are darker than stroma, background is bright: the signal a
    tissue detector or model can learn is really in the pixels, at the recorded places."""
    sample = odd_slide_zlib
    with open_slide(sample.path) as slide:
        level = 1
        ds = slide.info.level_downsamples[level]
        img = slide.pyramid[level][:].astype(float)
        means = {}
        for label in range(4):
            mask = sample.region_mask(label, ds)[: img.shape[0], : img.shape[1]]
            # stay away from boundaries: erode by checking 4-neighbours
            core = mask.copy()
            core[1:] &= mask[:-1]
            core[:-1] &= mask[1:]
            core[:, 1:] &= mask[:, :-1]
            core[:, :-1] &= mask[:, 1:]
            assert core.sum() > 50, CLASS_NAMES[label]
            means[label] = img[core].mean(axis=0)
        brightness = {k: v.mean() for k, v in means.items()}
        assert brightness[0] > 235
        assert brightness[0] > brightness[2] > brightness[1]
        assert brightness[2] > brightness[3]
        assert means[2][0] > means[2][1] + 30  # stroma is pink: red well above green


@pytest.mark.slow
def test_sample_slide_path_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_DISMM_CACHE", str(tmp_path))
    path = sample_slide_path()
    assert path.exists() and path.parent == tmp_path and sidecar_path(path).exists()
    mtime = path.stat().st_mtime_ns
    assert sample_slide_path() == path and path.stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob("*.part*"))
    with open_slide(path) as slide:
        assert slide.info.dimensions == (8192, 6144) and slide.info.level_count == 4
        assert slide.info.mpp == pytest.approx(0.25)
