"""Prediction -> layer-data tuples: placement in the slide's world frame, averaging, NaN, normalisation.

The alignment test plants attention on the generator's tumor regions (a synthetic
Prediction: the demo model is added by the lead later) and checks, through real napari
layer objects and their scale/translate, that the high values fall on the planted tumor.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from napari_dismm.bundle import PATCH_COLUMNS, Prediction
from napari_dismm.errors import DismmError
from napari_dismm.slide import open_slide, write_sample_slide
from napari_dismm.viewer.layers.prediction import (
    display_grid,
    grid_for,
    mean_grid,
    normalise,
    prediction_layer_data,
    smooth,
)

SLIDE_SIZE = (2400, 1800)
SLIDE_MPP = 0.5


def make_prediction(patches: pd.DataFrame, *, mpp: float | None = SLIDE_MPP, slide_id: str = "abc",
                    contours=(), task: str = "classification") -> Prediction:
    survival = task == "survival"
    return Prediction(
        slide_id=slide_id, slide_name="slide.tif", model_id="m1", model_kind="student", task=task,
        class_names=[] if survival else ["a", "b"], probabilities=None if survival else [0.3, 0.7],
        predicted_class=None if survival else "b", risk=-2.1 if survival else None,
        survival=[0.9, 0.7, 0.5, 0.3] if survival else None,
        bin_edges=[0.0, 10.0, 20.0, 30.0, None] if survival else None,
        trained_for="test", mpp=mpp, level0_size=SLIDE_SIZE, patches=patches,
        tissue_contours=[[tuple(p) for p in ring] for ring in contours],
    )


def patch_table(rows: list[dict]) -> pd.DataFrame:
    defaults = {"magnification": "20x", "tme_attention": 0.0, "ita_cluster": -1, "ita_centre": False}
    return pd.DataFrame([{**defaults, **r} for r in rows], columns=list(PATCH_COLUMNS))


def planted_prediction(sample, *, seed: int = 0) -> Prediction:
    """Patches on tissue at 20x (224 level-0 px at 0.5 µm/px) and 10x (448 px); tumor
    attention high where the patch centre lies in a planted tumor region, TME on stroma."""
    rng = np.random.default_rng(seed)
    w, h = sample.dimensions
    tables = []
    for mag, size in (("20x", int(224 * 0.5 / sample.mpp)), ("10x", int(448 * 0.5 / sample.mpp))):
        xs, ys = np.meshgrid(np.arange(0, w - size + 1, size), np.arange(0, h - size + 1, size))
        xs, ys = xs.ravel(), ys.ravel()
        # class fractions of each patch from an 8 x 8 sub-sampling of its box
        sub = (np.arange(8) + 0.5) * size / 8
        lab = sample.labels_at(xs[:, None, None] + sub[None, None, :], ys[:, None, None] + sub[None, :, None])
        frac = np.stack([(lab == k).mean(axis=(1, 2)) for k in range(4)], axis=1)
        keep = frac[:, 0] < 0.75
        xs, ys, frac = xs[keep], ys[keep], frac[keep]
        lab = frac.argmax(1)
        tumor = frac[:, 1] + rng.uniform(0, 0.1, len(xs))
        tme = frac[:, 2] + rng.uniform(0, 0.1, len(xs))
        clusters = (lab == 1).astype(int)
        centre = np.zeros(len(xs), bool)
        centre[[int(np.argmax(tumor)), int(np.argmax(tme))]] = True
        tables.append(pd.DataFrame({
            "x": xs, "y": ys, "width": size, "height": size, "magnification": mag,
            "tumor_attention": tumor / tumor.sum(), "tme_attention": tme / tme.sum(),
            "ita_cluster": clusters, "ita_centre": centre,
        }))
    return tables


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    path = tmp_path_factory.mktemp("slide") / "planted.tif"
    sample = write_sample_slide(path, width=SLIDE_SIZE[0], height=SLIDE_SIZE[1], mpp=SLIDE_MPP, seed=3)
    from napari_dismm.tissue import detect_tissue

    slide = open_slide(path)
    contours = detect_tissue(slide).outer
    pred = make_prediction(pd.concat(planted_prediction(sample), ignore_index=True),
                           slide_id=slide.info.slide_id, contours=contours)
    return sample, slide, pred


def _layer(data_tuple):
    from napari.layers import Layer

    data, kwargs, kind = data_tuple
    return Layer.create(data, kwargs, kind)


def _by_name(layers):
    return {kw["name"]: (data, kw, kind) for data, kw, kind in layers}


def test_tumor_layer_aligns_with_planted_tumor_in_world(planted):
    """Sample world points, map them through the attention layer AND the slide layer, and
    check the attention there separates planted tumor from the rest (AUROC >= 0.9)."""
    from napari_dismm.viewer.layers.slide import slide_layer_data

    sample, slide, pred = planted
    layers = _by_name(prediction_layer_data(pred, normalisation="raw", magnification="all"))
    slide_layer = _layer(slide_layer_data(slide))
    for mag in ("20x", "10x"):
        attention = _layer(layers[f"tumor attention {mag}"])
        rng = np.random.default_rng(1)
        # world points inside the slide, µm, (y, x)
        world = rng.uniform(0, 1, (6000, 2)) * np.array(SLIDE_SIZE[::-1]) * SLIDE_MPP
        # the slide layer says which level-0 pixel each world point is on ...
        pix = np.rint(np.array([slide_layer.world_to_data(p) for p in world])).astype(int)
        truth = sample.labels_at(pix[:, 1] + 0.5, pix[:, 0] + 0.5)
        # ... and the attention layer which grid cell
        cell = np.floor(np.array([attention.world_to_data(p) for p in world]) + 0.5).astype(int)
        grid = attention.data
        inside = (cell >= 0).all(1) & (cell[:, 0] < grid.shape[0]) & (cell[:, 1] < grid.shape[1])
        values = np.full(len(world), np.nan)
        values[inside] = grid[cell[inside, 0], cell[inside, 1]]
        known = np.isfinite(values)
        assert known.mean() > 0.2
        auroc = roc_auc_score(truth[known] == 1, values[known])
        assert auroc >= 0.9, (mag, auroc)
        # finite exactly where a patch of this magnification lies (NaN = transparent elsewhere)
        rows = pred.patches[pred.patches.magnification == mag]
        size = int(rows.width.iloc[0])
        occupied = set(zip(rows.x // size, rows.y // size))
        in_patch = np.array([(c // size, r // size) in occupied for r, c in pix])
        np.testing.assert_array_equal(known, in_patch)


def test_cell_edges_match_slide_pixels_exactly():
    """One 100 px patch at level-0 x in [300, 400): world points just inside its first and
    last level-0 pixel map into the cell, points just outside do not."""
    from napari.layers import Image

    pred = make_prediction(patch_table([{"x": 300, "y": 200, "width": 100, "height": 100, "tumor_attention": 1.0},
                                        {"x": 500, "y": 200, "width": 100, "height": 100, "tumor_attention": 0.0}]))
    data, kw, _ = _by_name(prediction_layer_data(pred, normalisation="raw"))["tumor attention 20x"]
    layer = Image(data, **{k: kw[k] for k in ("scale", "translate")})
    slide = Image(np.zeros((1800, 2400)), scale=(SLIDE_MPP, SLIDE_MPP))
    eps = 1e-6
    # world extent of level-0 pixels 300..399 according to the slide layer
    left = slide.data_to_world((250, 300))[1] - SLIDE_MPP / 2
    right = slide.data_to_world((250, 399))[1] + SLIDE_MPP / 2
    y = slide.data_to_world((250, 250))[0]

    def cell_of(x):
        return np.floor(np.asarray(layer.world_to_data((y, x))) + 0.5).astype(int)

    assert tuple(cell_of(left + eps)) == (0, 0)
    assert tuple(cell_of(right - eps)) == (0, 0)
    assert cell_of(left - eps)[1] == -1
    assert cell_of(right + eps)[1] == 1
    assert data[0, 0] == 1.0 and np.isnan(data[0, 1]) and data[0, 2] == 0.0


def test_overlapping_patches_are_averaged_by_area():
    # 224 px patches at step 112: the middle column is covered by both
    rows = [{"x": 0, "y": 0, "width": 224, "height": 224, "tumor_attention": 1.0},
            {"x": 112, "y": 0, "width": 224, "height": 224, "tumor_attention": 3.0}]
    patches = patch_table(rows)
    grid = grid_for(patches)
    assert grid.step == (112, 112) and grid.shape == (2, 3)
    out = mean_grid(patches, patches["tumor_attention"].to_numpy(), grid)
    np.testing.assert_allclose(out, [[1, 2, 3], [1, 2, 3]])
    # irregular coordinates: area weights (patch B covers a quarter of the first cell's row)
    rows = [{"x": 0, "y": 0, "width": 200, "height": 200, "tumor_attention": 1.0},
            {"x": 150, "y": 0, "width": 200, "height": 200, "tumor_attention": 5.0}]
    patches = patch_table(rows)
    grid = grid_for(patches)
    out = mean_grid(patches, patches["tumor_attention"].to_numpy(), grid)
    assert grid.step == (50, 50)
    np.testing.assert_allclose(out[0], [1, 1, 1, 3, 5, 5, 5])


def test_grid_nan_where_no_patch_and_labels_zero():
    rows = [{"x": 0, "y": 0, "width": 100, "height": 100, "tumor_attention": 0.5, "ita_cluster": 0},
            {"x": 200, "y": 100, "width": 100, "height": 100, "tumor_attention": 0.5, "ita_cluster": 1,
             "ita_centre": True}]
    layers = _by_name(prediction_layer_data(make_prediction(patch_table(rows)), normalisation="raw"))
    grid = layers["tumor attention 20x"][0]
    assert grid.shape == (2, 3)
    assert np.isfinite(grid).sum() == 2 and np.isnan(grid[1, 0]) and np.isnan(grid[0, 2])
    labels = layers["ITA tokens 20x"][0]
    np.testing.assert_array_equal(labels, [[1, 0, 0], [0, 0, 2]])
    centres = layers["ITA centres 20x"][0]
    np.testing.assert_allclose(centres, [[149.5, 249.5]])  # level-0 centre (250, 150) minus half a pixel


def test_normalisations():
    raw = np.array([[np.nan, 0.0, 1.0], [2.0, 3.0, 100.0]], dtype=np.float32)
    out, limits = normalise(raw, "raw")
    np.testing.assert_array_equal(out, raw)
    assert limits == (0.0, 100.0)
    out, limits = normalise(raw, "minmax")
    assert limits == (0.0, 1.0) and np.isnan(out[0, 0])
    np.testing.assert_allclose(out[1], [0.02, 0.03, 1.0])
    out, _ = normalise(raw, "percentile")
    finite = out[np.isfinite(out)]
    assert finite.min() == 0.0 and finite.max() == 1.0
    assert out[1, 1] < 0.1  # 3 lies far below the 99th percentile of (0, 1, 2, 3, 100)
    with pytest.raises(DismmError, match="normalisation"):
        normalise(raw, "zscore")


def test_percentile_is_robust_to_one_outlier():
    raw = np.linspace(0, 1, 200, dtype=np.float32).reshape(10, 20)
    raw[0, 0] = 1000.0
    mm, _ = normalise(raw, "minmax")
    pc, _ = normalise(raw, "percentile")
    assert np.median(mm) < 0.001 and 0.4 < np.median(pc) < 0.6


def test_smoothing_keeps_nan_and_mean():
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 1, (30, 40)).astype(np.float32)
    raw[:5] = np.nan
    out = smooth(raw, 2.0)
    assert np.isnan(out[:5]).all() and np.isfinite(out[5:]).all()
    assert out[5:].std() < raw[5:].std() / 2
    assert abs(np.nanmean(out) - np.nanmean(raw)) < 0.05
    np.testing.assert_array_equal(display_grid(raw, normalisation="raw", smoothing=0)[0], raw)


def test_layer_set_and_world_units(planted):
    _, _, pred = planted
    layers = prediction_layer_data(pred, magnification="all")
    names = [kw["name"] for _, kw, _ in layers]
    assert names[0] == "tissue" and names[-1] == "patches"
    for expected in ("tumor attention 20x", "TME attention 20x", "tumor attention 10x", "ITA tokens 20x",
                     "ITA centres 20x"):
        assert expected in names
    by = _by_name(layers)
    assert by["tumor attention 20x"][1]["scale"] == (112.0, 112.0)  # 224 px * 0.5 µm
    assert by["tumor attention 10x"][1]["scale"] == (224.0, 224.0)
    assert by["tumor attention 20x"][1]["visible"] and not by["tumor attention 10x"][1]["visible"]
    assert not by["TME attention 20x"][1]["visible"]
    points, kw, _ = by["patches"]
    assert len(points) == len(pred.patches)
    assert set(kw["features"].columns) == {"tumor_attention", "tme_attention", "ita_cluster", "magnification"}
    for _, kw, _ in layers:
        assert kw["units"] == ("um", "um")
    finest = _by_name(prediction_layer_data(pred))
    assert sorted(finest) == ["ITA centres 20x", "ITA tokens 20x", "TME attention 20x", "patches", "tissue",
                              "tumor attention 20x"]
    only10 = _by_name(prediction_layer_data(pred, magnification="10x"))
    assert "tumor attention 20x" not in only10
    assert len(only10["patches"][0]) == (pred.patches.magnification == "10x").sum()
    with pytest.raises(DismmError, match="40x"):
        prediction_layer_data(pred, magnification="40x")
    # every tuple builds a real napari layer
    for t in layers:
        _layer(t)


def test_unknown_mpp_uses_pixels():
    pred = make_prediction(patch_table([{"x": 0, "y": 0, "width": 64, "height": 64, "tumor_attention": 1.0}]),
                           mpp=None)
    by = _by_name(prediction_layer_data(pred))
    kw = by["tumor attention 20x"][1]
    assert kw["scale"] == (64.0, 64.0) and kw["translate"] == (31.5, 31.5) and kw["units"] == ("pixel", "pixel")


def test_no_patches_gives_no_grids():
    pred = make_prediction(patch_table([]).astype({"x": int}), contours=[[(0, 0), (10, 0), (10, 10)]])
    layers = prediction_layer_data(pred)
    assert [kw["name"] for _, kw, _ in layers] == ["tissue"]


@pytest.mark.parametrize("kind,name", [("mirror", "[CLS] attention 20x"), ("abmil", "ABMIL attention 20x")])
def test_single_map_models_get_one_attention_layer(kind, name):
    """MIRROR's [CLS] map (and ABMIL's) fills both bundle columns; the viewer shows it once,
    named for what it is, not as two identical 'tumor' and 'TME' maps."""
    rows = [{"x": 64 * i, "y": 0, "width": 64, "height": 64, "tumor_attention": a, "tme_attention": a}
            for i, a in enumerate([0.1, 0.2, 0.7])]
    pred = make_prediction(patch_table(rows))
    pred = dataclasses.replace(pred, model_kind=kind)
    by = _by_name(prediction_layer_data(pred))
    assert name in by and not any(n.startswith(("tumor attention", "TME attention")) for n in by)
    data, kw, _ = by[name]
    assert kw["visible"] and np.allclose(kw["metadata"]["raw"][0], [0.1, 0.2, 0.7])
