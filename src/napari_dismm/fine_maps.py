"""Finer attention maps: score an overlapping patch grid, keep the model's bag as trained.

Why: one flat square per 224 px patch is a coarse map. With an overlap ``o`` the grid's
stride is ``patch x (1 - o)`` (CLAM draws its heatmaps at 0.5-0.9), each display cell is
covered by several patches and shows the mean of their scores (`patch_grid.mean_grid`),
so the map gets ``1 / (1 - o)`` times finer per axis. It costs ``1 / (1 - o)^2`` times the
patches to encode (4x at 0.5) the first time; the overlapping grid's features are cached
like the others, in their own directory so the two grids never overwrite each other.

The prediction itself (class probabilities or risk) stays that of the non-overlapping
grid the model was trained on, unless ``bag="overlap"`` asks for the overlapping bag:
attention over overlapping patches counts each piece of tissue several times. The
attention maps are always those of the overlapping forward pass (one softmax over the
overlapping bag). ``Prediction.scope`` says which is which, and the panel shows it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from napari_dismm.bundle import Prediction, write_bundle
from napari_dismm.errors import DismmError

BAGS = ("grid", "overlap")
#: 0 is the plain grid; 0.9 is CLAM's finest heatmap setting
MAX_OVERLAP = 0.9


def check_overlap(overlap: float) -> float:
    overlap = float(overlap)
    if not (math.isfinite(overlap) and 0.0 <= overlap <= MAX_OVERLAP):
        raise DismmError(f"overlap must be a fraction of the patch in [0, {MAX_OVERLAP:g}], got {overlap:g}")
    return overlap


def overlap_pixels(overlap: float, patch_size: int) -> int:
    """Overlap in pixels at the target magnification (stride = patch x (1 - overlap))."""
    return min(patch_size - 1, round(overlap * patch_size))


def overlap_features_dir(features_dir: Path, pixels: int) -> Path:
    """Where an overlapping grid's feature files live (beside the plain grid's, not over them)."""
    return Path(features_dir) / f"overlap-{pixels}px"


def predict_slide_fine(
    *,
    slide_path: str | Path,
    model_dir: str | Path,
    overlap: float,
    bag: str = "grid",
    out_dir: str | Path | None = None,
    device: str = "auto",
    features_dir: str | Path | None = None,
    mpp: float | None = None,
    encoder_weights: str | Path | None = None,
    batch_size: int = 32,
    progress=None,
    cancel=None,
) -> Prediction:
    """`predict.predict_slide` with attention maps on an overlapping grid (see module doc)."""
    from napari_dismm import predict as base_predict
    from napari_dismm.slide.synthetic import cache_dir

    overlap = check_overlap(overlap)
    if bag not in BAGS:
        raise DismmError(f"bag must be one of {', '.join(BAGS)}, got {bag!r}")
    # share of the work in the plain grid: 1 patch per (1 / (1 - o))^2 overlapping ones
    plain_share = (1 - overlap) ** 2 / (1 + (1 - overlap) ** 2)
    plain = base_predict.predict_slide(
        slide_path=slide_path, model_dir=model_dir, device=device, features_dir=features_dir, mpp=mpp,
        encoder_weights=encoder_weights, batch_size=batch_size, cancel=cancel,
        progress=_scaled(progress, 0.0, plain_share if overlap > 0 else 1.0),
    )
    if overlap == 0:
        prediction = dataclasses.replace(plain, scope={**plain.scope, "overlap": 0.0, "bag": "grid"})
    else:
        prediction = _overlapping(
            plain, slide_path=Path(slide_path), model_dir=model_dir, overlap=overlap, bag=bag, device=device,
            features_dir=Path(features_dir) if features_dir is not None else cache_dir() / "features", mpp=mpp,
            encoder_weights=encoder_weights, batch_size=batch_size, cancel=cancel,
            progress=_scaled(progress, plain_share, 1.0),
        )
    if out_dir is not None:
        write_bundle(prediction, out_dir)
    return prediction


def _overlapping(plain: Prediction, *, slide_path: Path, model_dir, overlap: float, bag: str, device: str,
                 features_dir: Path, mpp, encoder_weights, batch_size: int, cancel, progress) -> Prediction:
    import time

    from napari_dismm import predict as base_predict
    from napari_dismm.features.extract import extract_slide, resolve_encoder
    from napari_dismm.tissue import TissueParams

    model, spec = base_predict.load_for_prediction(model_dir, device=device)
    enc = resolve_encoder(spec.encoder, weights=encoder_weights, device=device)
    pixels = overlap_pixels(overlap, spec.patch_size)
    watched = base_predict._WatchedEncoder(enc, progress=progress, cancel=cancel)
    watched.total = max(1, round(len(plain.patches) / (1 - overlap) ** 2))  # for the progress bar only
    timings = dict(plain.timings)
    t0 = watched.started = time.perf_counter()
    result = extract_slide(
        slide_path=slide_path, out_dir=overlap_features_dir(features_dir, pixels), encoder=watched,
        magnifications=spec.magnifications, patch_size=spec.patch_size, overlap=pixels,
        tissue_params=TissueParams(), batch_size=batch_size, mpp=mpp, device=device,
    )
    timings["overlap_features"] = time.perf_counter() - t0
    timings["overlap_encode"] = watched.encode_seconds
    files = {base_predict._label_for(o.magnification, spec): o.path for o in result.outputs}
    fine = base_predict._predict_from_files(
        model, spec, files, genes=None, cancel=cancel, progress=progress, timings={},
        slide=(plain.slide_id, plain.slide_name, plain.mpp, plain.level0_size), contours=plain.tissue_contours,
    )
    n_plain = len(plain.patches)
    scope = {
        **plain.scope, "overlap": overlap, "overlap_px": pixels, "stride_px": spec.patch_size - pixels,
        "bag": bag, "bag_patches": n_plain if bag == "grid" else len(fine.patches),
        "map_patches": len(fine.patches),
    }
    source = plain if bag == "grid" else fine
    return dataclasses.replace(source, patches=fine.patches, scope=scope, timings=timings)


def _scaled(progress, start: float, end: float):
    """A progress callback mapping one phase's encode fraction into [start, end] overall."""
    if progress is None:
        return None

    def report(stage: str, fraction: float) -> None:
        if stage == "model" and end >= 1.0:  # the last phase's model step
            progress(stage, fraction)
            return
        done = fraction if stage == "encode" else float(stage == "model" or fraction >= 1.0)
        progress("encode", start + (end - start) * done)

    return report


def scope_text(scope: dict[str, Any]) -> str | None:
    """One sentence for the panel on what the maps and the prediction were computed from."""
    parts = []
    if scope.get("region"):
        parts.append(f"prediction for the drawn region only ({scope.get('region_patches', '?')} patches), "
                     "not the whole slide")
    if scope.get("overlap"):
        bag = ("the overlapping grid" if scope.get("bag") == "overlap"
               else f"the non-overlapping grid ({scope.get('bag_patches', '?')} patches)")
        parts.append(f"maps on an overlapping grid (overlap {scope['overlap']:g}, stride "
                     f"{scope.get('stride_px', '?')} px, {scope.get('map_patches', '?')} patches); "
                     f"prediction from {bag}")
    return "; ".join(parts) or None
