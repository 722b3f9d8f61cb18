"""The pyramidal attention TIFFs of a bundle read back with tifffile and OpenSlide: the
slide's level-0 size and mpp, every patch's value on exactly the patch's pixels, levels
OpenSlide sees; and `dismm predict` on the real CMU slide writes them with the QuPath
detections."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import shapely
import tifffile
from shapely.geometry import shape

from napari_dismm.bundle import write_bundle
from napari_dismm.export import detections_name
from napari_dismm.overlay_tiff import decode, level_sizes, overlay_name
from napari_dismm.patch_grid import magnifications_of
from tests.test_export import grid_patches, prediction_for

SIZE = (3100, 1300)  # not tile multiples


def _description(path: Path) -> dict:
    with tifffile.TiffFile(path) as tif:
        return json.loads(tif.pages[0].description)


def _planted(seed: int = 0):
    rng = np.random.default_rng(seed)
    patches = grid_patches(2900, 1250, 250)
    patches["x"] += 37  # the grid does not start at the slide's origin
    patches["y"] += 11
    patches = patches[rng.random(len(patches)) < 0.8].reset_index(drop=True)  # holes: no tissue
    patches["tumor_attention"] = rng.random(len(patches))
    patches["tme_attention"] = rng.random(len(patches))
    return prediction_for(patches, SIZE)


def _check_against_patches(path: Path, rows, column: str, size: tuple[int, int], mpp: float) -> None:
    doc = _description(path)
    lo, hi = doc["lo"], doc["hi"]
    tolerance = (hi - lo) / 508 + 1e-12  # half a code step
    with tifffile.TiffFile(path) as tif:
        pages = list(tif.pages)
        level0 = pages[0].asarray()
        assert level0.shape == (size[1], size[0]) and level0.dtype == np.uint8
        assert pages[0].is_tiled and all(p.is_tiled for p in pages)
        assert [p.subfiletype for p in pages] == [0] + [1] * (len(pages) - 1)
        x_res = pages[0].tags["XResolution"].value
        assert pages[0].tags["ResolutionUnit"].value == 3  # centimetre
        assert 1e4 * x_res[1] / x_res[0] == pytest.approx(mpp)
        expected = [(w, h) for _, w, h in level_sizes(*size)]
        assert [(p.shape[1], p.shape[0]) for p in pages] == expected and len(pages) > 2
    covered = np.zeros(level0.shape, bool)
    for row in rows.itertuples():
        box = level0[row.y:row.y + row.height, row.x:row.x + row.width]
        assert (box == box.flat[0]).all()  # exactly the patch's pixels carry its value
        assert abs(decode(box.flat[0], lo, hi) - getattr(row, column)) <= tolerance
        covered[row.y:row.y + row.height, row.x:row.x + row.width] = True
    assert (level0[~covered] == 0).all() and (level0[covered] > 0).all()
    # OpenSlide sees the same pyramid, size and mpp
    slide = openslide.OpenSlide(str(path))
    try:
        assert slide.dimensions == size and slide.level_count == len(expected)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-6)
        first = rows.iloc[len(rows) // 2]
        region = np.asarray(slide.read_region((int(first.x), int(first.y)), 0, (int(first.width), 8)))
        assert (region[..., 0] == level0[first.y, first.x]).all() and (region[..., 3] == 255).all()
        d = 2
        w1, h1 = slide.level_dimensions[1]
        lvl1 = np.asarray(slide.read_region((0, 0), 1, (w1, h1)))[..., 0]
        # a level pixel shows the level-0 pixel under its centre (the last one past an odd edge)
        yy = np.minimum(np.floor((np.arange(h1) + 0.5) * d).astype(int), size[1] - 1)
        xx = np.minimum(np.floor((np.arange(w1) + 0.5) * d).astype(int), size[0] - 1)
        np.testing.assert_array_equal(lvl1, level0[np.ix_(yy, xx)])
    finally:
        slide.close()


def test_overlay_tiffs_read_back_aligned(tmp_path):
    pred = _planted()
    out = write_bundle(pred, tmp_path / "b")
    for subspace, column in (("tumor", "tumor_attention"), ("tme", "tme_attention")):
        path = out / overlay_name(subspace, "20x")
        assert _description(path)["subspace"] == subspace
        _check_against_patches(path, pred.patches, column, SIZE, mpp=0.5)


def test_overlapping_patches_give_their_mean(tmp_path):
    """Where patches overlap, the overlay holds the mean of the patches covering the pixel."""
    pred = prediction_for(grid_patches(1000, 500, 500), (1200, 700))
    extra = pred.patches.iloc[:1].assign(x=250, tumor_attention=3.0)
    pred.patches.loc[:, "tumor_attention"] = [1.0, 2.0]
    both = prediction_for(pred.patches._append(extra, ignore_index=True), (1200, 700))
    out = write_bundle(both, tmp_path / "b")
    path = out / overlay_name("tumor", "20x")
    doc = _description(path)
    level0 = tifffile.imread(path)
    values = decode(level0[[10, 10, 10], [100, 400, 700]], doc["lo"], doc["hi"])
    np.testing.assert_allclose(values, [1.0, (1.0 + 3.0) / 2, (2.0 + 3.0) / 2], atol=(3 - 1) / 508)


def test_dismm_predict_writes_detections_and_overlays(tmp_path, monkeypatch, cmu_slide_path):
    from napari_dismm.bundle import read_bundle
    from napari_dismm.cli import main

    monkeypatch.setenv("NAPARI_DISMM_CACHE", str(tmp_path / "cache"))
    assert main(["predict", str(cmu_slide_path), "--model", "demo", "--out", str(tmp_path / "b"),
                 "--device", "cpu"]) == 0
    pred = read_bundle(tmp_path / "b")
    size = openslide.OpenSlide(str(cmu_slide_path)).dimensions
    assert pred.level0_size == size
    finest = magnifications_of(pred.patches)[-1]
    rows = pred.patches[pred.patches.magnification == finest]
    bounds = shapely.box(0, 0, *size)
    for mag in pred.magnifications:
        features = json.loads((tmp_path / "b" / detections_name(mag)).read_text())["features"]
        assert len(features) == (pred.patches.magnification == mag).sum()
        assert all(bounds.covers(shape(f["geometry"])) for f in features)
    detections = json.loads((tmp_path / "b" / detections_name(finest)).read_text())["features"]
    first = shape(detections[0]["geometry"])
    assert first.bounds == (rows.x.iloc[0], rows.y.iloc[0], rows.x.iloc[0] + rows.width.iloc[0],
                            rows.y.iloc[0] + rows.height.iloc[0])
    assert detections[0]["properties"]["measurements"]["TME attention"] == pytest.approx(rows.tme_attention.iloc[0])
    _check_against_patches(tmp_path / "b" / overlay_name("tumor", finest), rows, "tumor_attention", size,
                           mpp=pred.mpp)
