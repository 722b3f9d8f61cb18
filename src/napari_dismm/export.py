"""Export a prediction for other tools: QuPath-importable GeoJSON and the patch CSV.

GeoJSON follows QuPath's conventions so "File > Import objects" shows named, coloured
annotations with their numbers: every feature carries ``properties.objectType``
(``"annotation"``), ``properties.classification`` ``{"name", "color": [r, g, b]}`` and
``properties.measurements`` (a flat name -> number dict). Coordinates are level-0 pixels
as (x, y) = (column, row), which is QuPath's image space; never (row, col).

Per subspace and magnification there are three kinds of feature: the contour of the
patches whose attention is in the top ``1 - threshold_quantile`` (the union of their
boxes, simplified), the ``top_k`` patches as boxes ranked by attention, and (once) the
tissue outline.

Measurement maps: :func:`detections_geojson` gives every patch of one magnification as a
QuPath *detection* (``objectType: "detection"``, its square in level-0 px) whose
``measurements`` are the tumor and TME attention, the ITA cluster and the centre flag, so
QuPath's *Measure > Show measurement maps* colours the slide by any of them. One file per
magnification (``detections_20x.geojson``): 10x and 20x squares overlap, and a measurement
map of both would draw one over the other.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely
from shapely.geometry import box, mapping
from shapely.geometry.polygon import orient

from napari_dismm.bundle import Prediction
from napari_dismm.errors import DismmError

#: subspace -> (patch-table column, QuPath class name, colour)
SUBSPACE_STYLE: dict[str, tuple[str, str, list[int]]] = {
    "tumor": ("tumor_attention", "Tumor attention", [220, 40, 40]),
    "tme": ("tme_attention", "TME attention", [40, 120, 220]),
}
TISSUE_CLASS = ("Tissue", [90, 160, 90])


def attention_geojson(prediction: Prediction, *, threshold_quantile: float = 0.9, top_k: int = 20) -> dict[str, Any]:
    """A GeoJSON FeatureCollection (dict) of attention contours, top-k patches and tissue."""
    if not 0.0 <= threshold_quantile < 1.0:
        raise DismmError(f"threshold_quantile must be in [0, 1), got {threshold_quantile}")
    if top_k < 0:
        raise DismmError(f"top_k must be >= 0, got {top_k}")
    bounds = None
    if prediction.level0_size is not None:
        bounds = box(0, 0, *prediction.level0_size)
    features: list[dict[str, Any]] = []
    patches = prediction.patches
    for mag in prediction.magnifications:
        rows = patches[patches["magnification"] == mag]
        for subspace in SUBSPACE_STYLE:
            features.extend(_contour_features(prediction, rows, subspace, mag, threshold_quantile, bounds))
            features.extend(_top_k_features(rows, subspace, mag, top_k))
    features.extend(_tissue_features(prediction, bounds))
    return _feature_collection(prediction, features)


def _feature_collection(prediction: Prediction, features: list[dict[str, Any]], **properties: str) -> dict[str, Any]:
    """A GeoJSON FeatureCollection naming the slide and model its features come from."""
    return {
        "type": "FeatureCollection",
        "features": features,
        "properties": {
            "slide_id": prediction.slide_id,
            "slide_name": prediction.slide_name,
            "model_id": prediction.model_id,
            **properties,
            "coordinate_space": "level-0 pixels (x, y)",
        },
    }


def _feature(geometry: Any, *, name: str, cls: tuple[str, list[int]], measurements: dict, **extra: Any) -> dict:
    return {
        "type": "Feature",
        "geometry": mapping(geometry),
        "properties": {
            "objectType": "annotation",
            "name": name,
            "classification": {"name": cls[0], "color": list(cls[1])},
            "isLocked": False,
            "measurements": {k: float(v) for k, v in measurements.items()},
            **extra,
        },
    }


def _boxes(rows: pd.DataFrame) -> list[Any]:
    xywh = rows[["x", "y", "width", "height"]].to_numpy(dtype=np.float64)
    return list(shapely.box(xywh[:, 0], xywh[:, 1], xywh[:, 0] + xywh[:, 2], xywh[:, 1] + xywh[:, 3]))


def _oriented(geom: Any) -> Any:
    """Exterior rings counter-clockwise (RFC 7946); QuPath reads either orientation."""
    if geom.geom_type == "Polygon":
        return orient(geom, 1.0)
    if geom.geom_type == "MultiPolygon":
        return shapely.MultiPolygon([orient(p, 1.0) for p in geom.geoms])
    polys = [orient(g, 1.0) for g in getattr(geom, "geoms", []) if g.geom_type == "Polygon"]
    return shapely.MultiPolygon(polys)


def _contour_features(prediction, rows, subspace, mag, quantile, bounds) -> list[dict]:
    column, cls_name, colour = SUBSPACE_STYLE[subspace]
    values = rows[column].to_numpy(dtype=np.float64)
    if values.size == 0 or not (values > 0).any():
        return []
    threshold = float(np.quantile(values, quantile))
    # strictly above a tied low threshold (a flat background is not "top"), else at it
    keep = values > threshold
    if not keep.any():
        keep = (values >= threshold) & (values > 0)
    chosen = rows[keep]
    size = float(chosen["width"].min())
    union = shapely.unary_union(_boxes(chosen))
    # tolerance well below a patch: removes collinear grid vertices, keeps the shape
    shape = union.simplify(0.05 * size, preserve_topology=True)
    if bounds is not None:
        shape = shape.intersection(bounds)
    if shape.is_empty:
        return []
    measurements = {
        "threshold": threshold,
        "quantile": quantile,
        "n_patches": int(keep.sum()),
        "attention_inside": float(values[keep].sum()),
        "area_px2": float(shape.area),
    }
    return [
        _feature(
            _oriented(shape),
            name=f"{cls_name} top {100 * (1 - quantile):g}% ({mag})",
            cls=(cls_name, colour),
            measurements=measurements,
            subspace=subspace,
            magnification=mag,
            kind="attention_contour",
        )
    ]


def _top_k_features(rows, subspace, mag, top_k) -> list[dict]:
    column, cls_name, colour = SUBSPACE_STYLE[subspace]
    if top_k == 0 or rows.empty:
        return []
    ranked = rows.sort_values(column, ascending=False, kind="stable").head(top_k)
    ranked = ranked[ranked[column] > 0]
    out = []
    for rank, (geom, (_, row)) in enumerate(zip(_boxes(ranked), ranked.iterrows(), strict=True), start=1):
        attention = float(row[column])
        out.append(
            _feature(
                _oriented(geom),
                name=f"{cls_name} #{rank} ({mag})",
                cls=(cls_name, colour),
                measurements={"attention": attention, "rank": rank, "ita_cluster": int(row["ita_cluster"])},
                subspace=subspace,
                attention=attention,
                rank=rank,
                magnification=mag,
                kind="top_patch",
            )
        )
    return out


def _tissue_features(prediction: Prediction, bounds) -> list[dict]:
    out = []
    for i, ring in enumerate(prediction.tissue_contours):
        if len(ring) < 3:
            continue
        poly = shapely.Polygon(ring)
        if not poly.is_valid:
            poly = shapely.make_valid(poly)
        if bounds is not None:
            poly = poly.intersection(bounds)
        if poly.is_empty or poly.area == 0:
            continue
        out.append(
            _feature(
                _oriented(poly), name=f"Tissue {i + 1}", cls=TISSUE_CLASS,
                measurements={"area_px2": poly.area}, kind="tissue",
            )
        )
    return out


# --------------------------------------------------------------------------- detections

#: QuPath measurement names of a patch detection -> patch-table column
DETECTION_MEASUREMENTS = {
    "Tumor attention": "tumor_attention",
    "TME attention": "tme_attention",
    "ITA cluster": "ita_cluster",
    "ITA centre": "ita_centre",
}
DETECTION_CLASS = ("Patch", [200, 200, 200])


def detections_name(magnification: str) -> str:
    """Bundle file name of one magnification's patch detections."""
    return f"detections_{magnification}.geojson"


def detections_geojson(prediction: Prediction, *, magnification: str) -> dict[str, Any]:
    """Every patch of ``magnification`` as a QuPath detection with its scores as measurements.

    Squares are clipped to the slide (a patch is never drawn outside it); rings run
    counter-clockwise as in :func:`attention_geojson`. ``ITA cluster`` is -1 for a model
    without token aggregation, ``ITA centre`` is 1 or 0."""
    patches = prediction.patches
    rows = patches[patches["magnification"] == magnification]
    x0 = rows["x"].to_numpy(np.float64)
    y0 = rows["y"].to_numpy(np.float64)
    x1 = x0 + rows["width"].to_numpy(np.float64)
    y1 = y0 + rows["height"].to_numpy(np.float64)
    if prediction.level0_size is not None:
        w, h = prediction.level0_size
        x0, x1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
        y0, y1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    values = {name: rows[column].to_numpy() for name, column in DETECTION_MEASUREMENTS.items()}
    cls = {"name": DETECTION_CLASS[0], "color": list(DETECTION_CLASS[1])}
    features = []
    for i in range(len(rows)):
        if x1[i] <= x0[i] or y1[i] <= y0[i]:
            continue  # wholly outside the slide
        a, b, c, d = float(x0[i]), float(y0[i]), float(x1[i]), float(y1[i])
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[c, b], [c, d], [a, d], [a, b], [c, b]]]},
            "properties": {
                "objectType": "detection",
                "classification": cls,
                "isLocked": True,
                "measurements": {name: float(v[i]) for name, v in values.items()},
            },
        })
    return _feature_collection(prediction, features, magnification=str(magnification))


def write_bundle_overlays(prediction: Prediction, directory: str | os.PathLike) -> list[str]:
    """Write the bundle's files for other tools into ``directory``; returns their names.

    The bundle writer calls this (``dismm predict`` and the widget's Export both write
    bundles through it): per magnification the QuPath detections, and the finest
    magnification's attention maps as pyramidal TIFFs aligned with the slide
    (:mod:`napari_dismm.overlay_tiff`)."""
    from napari_dismm.overlay_tiff import write_prediction_overlays

    directory = Path(directory)
    names = write_prediction_overlays(prediction, directory)
    for mag in prediction.magnifications:
        name = detections_name(mag)
        doc = detections_geojson(prediction, magnification=mag)
        (directory / name).write_text(json.dumps(doc, allow_nan=False), encoding="utf-8")
        names.append(name)
    return names


# --------------------------------------------------------------------------- files


def _atomic_write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def write_geojson(
    prediction: Prediction, path: str | os.PathLike, *, threshold_quantile: float = 0.9, top_k: int = 20
) -> Path:
    """Write :func:`attention_geojson` to ``path`` (atomically); returns the path."""
    doc = attention_geojson(prediction, threshold_quantile=threshold_quantile, top_k=top_k)
    return _atomic_write_text(Path(path), json.dumps(doc, allow_nan=False))


def patches_csv(prediction: Prediction, path: str | os.PathLike) -> Path:
    """Write the patch table (the bundle's ``patches.csv`` columns) to ``path``."""
    return _atomic_write_text(Path(path), prediction.patches.to_csv(index=False))
