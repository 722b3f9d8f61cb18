"""QuPath GeoJSON export: read back with shapely, inside the slide, (x, y) not (row, col),
and on the regions planted in a generated slide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import shape

from napari_dismm.bundle import ATTENTION_GEOJSON, Prediction, read_bundle, write_bundle
from napari_dismm.errors import DismmError
from napari_dismm.export import attention_geojson, patches_csv, write_geojson


def grid_patches(width: int, height: int, size: int, mag: str = "20x") -> pd.DataFrame:
    xs, ys = np.meshgrid(np.arange(0, width - size + 1, size), np.arange(0, height - size + 1, size))
    n = xs.size
    return pd.DataFrame({
        "x": xs.ravel(), "y": ys.ravel(), "width": size, "height": size, "magnification": mag,
        "tumor_attention": np.full(n, 1.0 / n), "tme_attention": np.full(n, 1.0 / n),
        "ita_cluster": np.zeros(n, dtype=int), "ita_centre": np.zeros(n, dtype=bool),
    })


def prediction_for(patches: pd.DataFrame, size: tuple[int, int], contours=()) -> Prediction:
    return Prediction(
        slide_id="id", slide_name="s", model_id="m", model_kind="student", task="classification",
        class_names=["a", "b"], probabilities=[0.4, 0.6], predicted_class="b", risk=None, survival=None,
        bin_edges=None, trained_for="t", mpp=0.5, level0_size=size, patches=patches,
        tissue_contours=list(contours),
    )


def plant(patches: pd.DataFrame, column: str, hot: np.ndarray) -> pd.DataFrame:
    """Attention 1 on ``hot`` patches, 0.001 elsewhere, normalised per magnification."""
    out = patches.copy()
    values = np.where(hot, 1.0, 1e-3)
    out[column] = values / values.sum()
    return out


def features_of(doc: dict, kind: str, subspace: str | None = None) -> list[dict]:
    return [
        f for f in doc["features"]
        if f["properties"]["kind"] == kind and (subspace is None or f["properties"].get("subspace") == subspace)
    ]


def test_qupath_conventions_and_slide_bounds() -> None:
    w, h = 6000, 2000
    pred = prediction_for(grid_patches(w, h, 250), (w, h), contours=[[(100, 100), (5900, 100), (5900, 1900)]])
    doc = json.loads(json.dumps(attention_geojson(pred, top_k=5)))  # plain JSON survives
    assert doc["type"] == "FeatureCollection" and doc["features"]
    slide = shapely.box(0, 0, w, h)
    for feature in doc["features"]:
        props = feature["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] in {"Tumor attention", "TME attention", "Tissue"}
        assert len(props["classification"]["color"]) == 3
        assert all(isinstance(v, float) for v in props["measurements"].values())
        geom = shape(feature["geometry"])
        assert geom.is_valid and not geom.is_empty
        assert slide.buffer(1e-6).contains(geom)
    assert len(features_of(doc, "top_patch", "tumor")) == 5
    assert len(features_of(doc, "tissue")) == 1
    ranks = [f["properties"]["rank"] for f in features_of(doc, "top_patch", "tme")]
    assert ranks == [1, 2, 3, 4, 5]


def test_xy_order_on_a_planted_asymmetric_region() -> None:
    """High tumor attention in a box far right and near the top of a wide slide: the
    contour must cover that box, not its transpose (which would lie outside the slide)."""
    w, h, size = 6000, 2000, 200
    patches = grid_patches(w, h, size)
    region = shapely.box(4000, 200, 5000, 1000)  # x in [4000, 5000), y in [200, 1000)
    cx, cy = patches["x"] + size / 2, patches["y"] + size / 2
    hot = shapely.contains_xy(region, cx.to_numpy(), cy.to_numpy())
    pred = prediction_for(plant(patches, "tumor_attention", hot), (w, h))
    doc = attention_geojson(pred, threshold_quantile=0.9, top_k=3)
    (contour,) = features_of(doc, "attention_contour", "tumor")
    geom = shape(contour["geometry"])
    assert geom.symmetric_difference(region).area < 1e-6 * region.area
    transposed = shapely.box(200, 4000, 1000, 5000)
    assert geom.intersection(transposed).area == 0
    x0, y0, x1, y1 = geom.bounds
    assert (x0, y0, x1, y1) == (4000, 200, 5000, 1000)
    for top in features_of(doc, "top_patch", "tumor"):
        assert region.contains(shape(top["geometry"]))
    assert contour["properties"]["measurements"]["n_patches"] == int(hot.sum())


def test_contours_lie_on_planted_tumor_of_a_generated_slide(tmp_path: Path) -> None:
    """Attention planted on the tumor patches of a real generated slide (tiled by our
    tiler): the exported contour, read back from the file, covers tumor tissue."""
    from napari_dismm.slide import open_slide, write_sample_slide
    from napari_dismm.tiling import make_grid
    from napari_dismm.tissue import detect_tissue

    sample = write_sample_slide(tmp_path / "s.tif", width=4000, height=2400, mpp=0.5, seed=3)
    with open_slide(sample.path) as slide:
        mask = detect_tissue(slide)
        grid = make_grid(slide, target_mpp=0.5, patch_size=112, tissue=mask, min_tissue=0.25)
    size = grid.patch_size_level0
    patches = pd.DataFrame({
        "x": grid.coords[:, 0], "y": grid.coords[:, 1], "width": size, "height": size, "magnification": "20x",
        "tumor_attention": 0.0, "tme_attention": 0.0, "ita_cluster": -1, "ita_centre": False,
    })
    centre_labels = sample.labels_at(grid.coords[:, 0] + size / 2, grid.coords[:, 1] + size / 2)
    tumor = sample.class_names.index("tumor")
    hot = centre_labels == tumor
    assert 0.05 < hot.mean() < 0.9  # the layout planted a tumor region of useful size
    patches = plant(patches, "tumor_attention", hot)
    patches = plant(patches, "tme_attention", centre_labels == sample.class_names.index("immune"))
    pred = prediction_for(patches, sample.dimensions, contours=[ring.tolist() for ring in mask.outer])
    path = write_geojson(pred, tmp_path / "a.geojson")
    doc = json.loads(path.read_text())

    (contour,) = features_of(doc, "attention_contour", "tumor")
    geom = shape(contour["geometry"])
    ds = 16
    truth = sample.region_mask("tumor", ds)
    ys, xs = np.nonzero(np.ones_like(truth))
    inside = shapely.contains_xy(geom, (xs + 0.5) * ds, (ys + 0.5) * ds).reshape(truth.shape)
    on_tumor = truth[inside].mean()
    assert on_tumor > 0.8, on_tumor
    # the (row, col) mistake would put the contour elsewhere (or off the slide)
    flipped = shapely.affinity.affine_transform(geom, [0, 1, 1, 0, 0, 0])
    inside_t = shapely.contains_xy(flipped, (xs + 0.5) * ds, (ys + 0.5) * ds).reshape(truth.shape)
    assert truth[inside_t].mean() < on_tumor - 0.3 if inside_t.any() else True
    w, h = sample.dimensions
    for feature in doc["features"]:
        bx0, by0, bx1, by1 = shape(feature["geometry"]).bounds
        assert 0 <= bx0 <= bx1 <= w and 0 <= by0 <= by1 <= h
    tissue = shapely.unary_union([shape(f["geometry"]) for f in features_of(doc, "tissue")])
    assert tissue.contains(geom.buffer(-size))  # attention lies on tissue


def test_bundle_geojson_and_csv_files(tmp_path: Path) -> None:
    pred = prediction_for(grid_patches(3000, 1000, 250), (3000, 1000))
    out = write_bundle(pred, tmp_path / "b")
    doc = json.loads((out / ATTENTION_GEOJSON).read_text())
    assert doc == json.loads(json.dumps(attention_geojson(pred)))
    csv = patches_csv(pred, tmp_path / "p.csv")
    assert pd.read_csv(csv).shape == (len(pred.patches), 9)
    assert read_bundle(out).patches.equals(pred.patches)


def test_bad_export_options() -> None:
    pred = prediction_for(grid_patches(1000, 1000, 250), (1000, 1000))
    with pytest.raises(DismmError, match="threshold_quantile"):
        attention_geojson(pred, threshold_quantile=1.0)
    with pytest.raises(DismmError, match="top_k"):
        attention_geojson(pred, top_k=-1)


def test_qupath_detections_read_back_with_shapely(tmp_path: Path) -> None:
    """Every patch is a detection whose square and measurements are the patch's own; a patch
    hanging over the slide's edge is clipped to it; one file per magnification."""
    from napari_dismm.export import detections_name

    w, h = 3100, 1300
    rng = np.random.default_rng(0)
    fine = grid_patches(w, h, 250)
    fine["tumor_attention"] = rng.random(len(fine))
    fine["tme_attention"] = rng.random(len(fine))
    fine["ita_cluster"] = rng.integers(0, 2, len(fine))
    fine["ita_centre"] = np.arange(len(fine)) < 2
    coarse = grid_patches(w, h, 500, mag="10x")
    edge = coarse.iloc[:1].assign(x=w - 300, y=h - 200, tumor_attention=0.5)  # overhangs the corner
    pred = prediction_for(pd.concat([fine, coarse, edge], ignore_index=True), (w, h))
    out = write_bundle(pred, tmp_path / "b")
    slide = shapely.box(0, 0, w, h)
    for mag, rows in (("20x", fine), ("10x", pd.concat([coarse, edge], ignore_index=True))):
        doc = json.loads((out / detections_name(mag)).read_text())
        assert doc["properties"]["magnification"] == mag
        features = doc["features"]
        assert len(features) == len(rows)
        for feature, (_, row) in zip(features, rows.iterrows(), strict=True):
            props = feature["properties"]
            assert props["objectType"] == "detection"
            geom = shape(feature["geometry"])
            assert geom.is_valid and slide.covers(geom)
            x1, y1 = min(row.x + row.width, w), min(row.y + row.height, h)
            assert geom.equals(shapely.box(row.x, row.y, x1, y1)), (geom.bounds, row.x, row.y)
            m = props["measurements"]
            assert m["Tumor attention"] == pytest.approx(row.tumor_attention, rel=1e-12)
            assert m["TME attention"] == pytest.approx(row.tme_attention, rel=1e-12)
            assert m["ITA cluster"] == row.ita_cluster and m["ITA centre"] == float(row.ita_centre)
    # the clipped corner patch: 300 x 200 px of it lie inside
    corner = shape(json.loads((out / detections_name("10x")).read_text())["features"][-1]["geometry"])
    assert corner.area == pytest.approx(300 * 200)
