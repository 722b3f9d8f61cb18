"""Prediction for a region a pathologist draws: only the patches inside it, in seconds.

Why: a whole slide of 100k patches takes minutes to encode on a CPU, and the question is
often about one area. The region is a polygon (or several) in level-0 pixels (x, y); a
patch belongs to it when its centre lies inside (a patch is never split). Tissue and
tiling are those of the whole slide, so the region's patches are exactly the whole-slide
grid's patches there, and cached whole-slide features are reused when present (then no
pixel is read); otherwise only the region's patches are read and encoded. The model's bag
is the region's patches: the class probabilities or risk are the region's, not the
slide's, and ``Prediction.scope["region"]`` says so (the layers and the panel too).

With an overlap (`fine_maps`: stride = patch x (1 - overlap)) the maps come from the
overlapping grid's patches inside the region (its whole-slide features reused when cached,
in their own directory), and the class probabilities or risk from the plain grid's region
bag unless ``bag="overlap"``, as for a whole slide.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from napari_dismm.bundle import Prediction, write_bundle
from napari_dismm.errors import DismmError
from napari_dismm.features.extract import encode_grid  # module attribute: tests count the patches encoded

Polygon = Sequence[tuple[float, float]]


def region_geometry(polygons: Sequence[Polygon]):
    """The union of the region's polygons (level-0 (x, y)); a clear error when it is empty."""
    import shapely

    parts = []
    for ring in polygons:
        ring = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
        if len(ring) >= 3:
            poly = shapely.Polygon(ring)
            parts.append(poly if poly.is_valid else shapely.make_valid(poly))
    union = shapely.unary_union(parts) if parts else None
    if union is None or union.is_empty or union.area <= 0:
        raise DismmError("the region has no area: draw a rectangle or a polygon")
    return union


def patches_inside(coords: np.ndarray, size_level0: int, geometry) -> np.ndarray:
    """Boolean mask of the patches whose centre lies inside ``geometry`` (or on its edge)."""
    import shapely

    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    centre = coords + size_level0 / 2.0
    return shapely.intersects_xy(geometry, centre[:, 0], centre[:, 1])


def predict_region(
    *,
    slide_path: str | Path,
    model_dir: str | Path,
    region: Sequence[Polygon],
    out_dir: str | Path | None = None,
    device: str = "auto",
    features_dir: str | Path | None = None,
    mpp: float | None = None,
    encoder_weights: str | Path | None = None,
    batch_size: int = 32,
    progress=None,
    cancel=None,
    overlap: float = 0.0,
    bag: str = "grid",
) -> Prediction:
    """Tissue -> the whole-slide grid -> the patches inside ``region`` -> features -> model
    (and with ``overlap`` > 0 the overlapping grid's patches inside it for the maps)."""
    from napari_dismm import predict as base
    from napari_dismm.features.cache import cache_key, cached, feature_path
    from napari_dismm.features.extract import resolve_encoder
    from napari_dismm.features.h5 import FeatureFile, read_features, write_features
    from napari_dismm.fine_maps import BAGS, check_overlap, overlap_features_dir, overlap_pixels
    from napari_dismm.slide import open_slide
    from napari_dismm.slide.synthetic import cache_dir
    from napari_dismm.tiling import magnification_to_mpp, make_grid
    from napari_dismm.tissue import TissueParams, detect_tissue, require_tissue

    started = time.perf_counter()
    overlap = check_overlap(overlap)
    if bag not in BAGS:
        raise DismmError(f"bag must be one of {', '.join(BAGS)}, got {bag!r}")
    geometry = region_geometry(region)
    slide_path = Path(slide_path)
    model, spec = base.load_for_prediction(model_dir, device=device)
    base._refuse_without_genes(spec, None)
    enc = resolve_encoder(spec.encoder, weights=encoder_weights, device=device)
    base.check_features_match(spec, encoder=enc.name, dim=enc.dim, where="the encoder gives",
                              weights_hash=enc.weights_hash)
    feat_root = Path(features_dir) if features_dir is not None else cache_dir() / "features"
    pixels = overlap_pixels(overlap, spec.patch_size) if overlap > 0 else 0
    # grid overlap in px -> where its whole-slide features are cached (`fine_maps`)
    roots = {0: feat_root, **({pixels: overlap_features_dir(feat_root, pixels)} if pixels else {})}
    watched = base._WatchedEncoder(enc, progress=progress, cancel=cancel)
    timings: dict[str, float] = {}
    params = TissueParams()
    base._poll(cancel)
    with open_slide(slide_path, mpp=mpp) as slide, tempfile.TemporaryDirectory(prefix="dismm-region-") as tmp:
        t0 = time.perf_counter()
        info, mpp0 = slide.info, slide.require_mpp()
        mask = require_tissue(detect_tissue(slide, params=params))
        plans = []
        for px, root in roots.items():
            for label in spec.magnifications:
                mag = base._mag_value(label)
                grid = make_grid(slide, target_mpp=magnification_to_mpp(mag), patch_size=spec.patch_size,
                                 overlap=px, tissue=mask)
                inside = patches_inside(grid.coords, grid.patch_size_level0, geometry)
                # the key `extract_slide` gives the whole slide's features, so they are reused
                key = cache_key(slide_id=info.slide_id, slide_mpp=mpp0, encoder=enc.name,
                                weights_hash=enc.weights_hash, magnification=mag, patch_size=spec.patch_size,
                                overlap=px, tissue_params=params, min_tissue=0.25,
                                preprocessing=getattr(enc, "preprocessing", None))
                path = feature_path(root, encoder=enc.name, magnification=mag, slide_stem=slide_path.stem)
                plans.append((px, label, mag, grid, inside, path if cached(path, key) else None))
        timings["tissue"] = time.perf_counter() - t0
        if not any(inside.any() for px, _, _, _, inside, _ in plans if px == 0):
            raise DismmError("no tissue patch has its centre inside the region: draw it over tissue")
        watched.total = sum(int(inside.sum()) for *_, inside, hit in plans if hit is None)
        _report_start(progress)
        files: dict[int, dict[str, Path]] = {px: {} for px in roots}
        t0 = watched.started = time.perf_counter()
        for px, label, mag, grid, inside, hit in plans:
            if not inside.any():
                continue
            sub = replace(grid, coords=grid.coords[inside], tissue_fraction=grid.tissue_fraction[inside])
            if hit is not None:  # whole-slide features cached: take the region's rows, read no pixel
                whole = read_features(hit)
                rows = _rows_of(whole.coords, sub.coords)
                features = whole.features[rows]
            else:
                features = encode_grid(slide, sub, watched, batch_size=batch_size)
            files[px][label] = write_features(Path(tmp) / f"{label}-{px}.h5", FeatureFile(
                features=features, coords=sub.coords, patch_size=sub.patch_size, overlap=px,
                patch_size_level0=sub.patch_size_level0, target_magnification=mag, level0_magnification=10.0 / mpp0,
                name=slide_path.stem, level0_width=int(info.dimensions[0]), level0_height=int(info.dimensions[1]),
                mpp=mpp0, encoder=enc.name, encoder_weights_hash=enc.weights_hash, slide_id=info.slide_id,
            ))
        timings["encode"] = watched.encode_seconds
        timings["read"] = watched.wait_seconds
        timings["features_reused"] = float(all(hit is not None for *_, hit in plans))
        timings["features"] = time.perf_counter() - t0
        _report_end(progress)
        if pixels and set(files[pixels]) != set(files[0]):
            raise DismmError("the overlapping grid has no patch inside the region at some magnification: "
                             "draw a larger region or use no overlap")
        common = {"slide": (info.slide_id, slide_path.name, mpp0, tuple(info.dimensions)),
                  "contours": [[(float(x), float(y)) for x, y in ring] for ring in mask.outer]}
        prediction = base._predict_from_files(model, spec, files[0], genes=None, cancel=cancel, progress=progress,
                                              timings=timings, **common)
        scope = {}
        if pixels:
            fine = base._predict_from_files(model, spec, files[pixels], genes=None, cancel=cancel, progress=progress,
                                            timings={}, **common)
            scope = {"overlap": overlap, "overlap_px": pixels, "stride_px": spec.patch_size - pixels, "bag": bag,
                     "bag_patches": len(prediction.patches) if bag == "grid" else len(fine.patches),
                     "map_patches": len(fine.patches)}
            prediction = replace(prediction if bag == "grid" else fine, patches=fine.patches)
    timings["total"] = time.perf_counter() - started
    rings = _rings(geometry)
    prediction = replace(prediction, timings=timings, scope={
        **scope, "region": rings, "region_patches": int(scope.get("bag_patches", len(prediction.patches))),
        "region_area_mm2": float(geometry.area) * (mpp0 / 1000.0) ** 2,
    })
    if out_dir is not None:
        write_bundle(prediction, out_dir)
    return prediction


def _rows_of(whole: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Indices into ``whole`` (N, 2) of the coordinate pairs ``wanted`` (all present)."""
    index = {(int(x), int(y)): i for i, (x, y) in enumerate(whole)}
    try:
        return np.array([index[(int(x), int(y))] for x, y in wanted], dtype=np.int64)
    except KeyError:
        raise DismmError("the cached features do not match the slide's grid; delete the feature cache") from None


def _rings(geometry) -> list[list[list[float]]]:
    polys = getattr(geometry, "geoms", [geometry])
    return [[[float(x), float(y)] for x, y in p.exterior.coords] for p in polys if p.geom_type == "Polygon"]


def _report_start(progress) -> None:
    if progress is not None:
        progress("features", 0.0)


def _report_end(progress) -> None:
    if progress is not None:
        progress("features", 1.0)
