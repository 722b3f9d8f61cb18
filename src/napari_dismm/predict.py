"""Slide (or its feature files) + model -> :class:`~napari_dismm.bundle.Prediction`.

Why it is shaped this way:
- Features always go through :func:`~napari_dismm.features.extract.extract_slide`, whose
  content-addressed files make a second prediction of the same slide skip reading and
  encoding; :func:`predict_features` runs the very same model step on existing files, so a
  prediction from features equals one from pixels.
- The model's ``config.json`` says what it was trained on (keys below, written by the
  training backend). A model for other features is refused before any pixel is read.
- Progress is reported once per encoded batch; cancel is polled before every layer of the
  encoder's forward pass (`cancel_inside`) and between stages, so a widget keeps the CLI's
  batch size and still stops a run within a second.

``config.json`` keys read here (top level, beside ``model``; all optional unless noted):

- ``encoder`` (:data:`EXTRA_ENCODER`): patch encoder name (default ``efficientnet-lite0``);
- ``encoder_weights_hash``: the encoder's weights hash; a different one is refused;
- ``encoder_preprocessing``: the encoder's pixel pipeline; a different one is refused;
- ``magnifications``: magnification labels, must agree with the architecture's;
- ``class_names``: classification class names (default ``class 0``, ``class 1``, ...);
- ``bin_edges``: survival time-bin edges (n_bins + 1 values, last may be ``Infinity``);
- ``patch_size``: patch side in pixels at the target magnification (default 224);
- ``trained_for``: a human description, e.g. ``"4-class diagnosis on TCGA GBM-LGG"``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_dismm.bundle import BundleMismatchError, check_bundle_matches_slide  # noqa: F401  (re-exported)
from napari_dismm.bundle import PATCH_COLUMNS, Prediction, write_bundle
from napari_dismm.errors import DismmError, FeatureFileError, ModelConfigError, SlideError

EXTRA_ENCODER = "encoder"
EXTRA_ENCODER_WEIGHTS_HASH = "encoder_weights_hash"
EXTRA_MAGNIFICATIONS = "magnifications"
EXTRA_CLASS_NAMES = "class_names"
EXTRA_BIN_EDGES = "bin_edges"
EXTRA_PATCH_SIZE = "patch_size"
EXTRA_TRAINED_FOR = "trained_for"
DEFAULT_PATCH_SIZE = 224
#: the encoder name `dismm synth` writes into its feature files: no slide can give them
SYNTHETIC_ENCODER = "synthetic"
DEMO_MODEL_DIR = Path(__file__).parent / "data" / "demo_model"
NEEDS_GENES = ("teacher", "late_fusion", "genes_only")
#: attention maps of models without subspaces (see ``_patch_rows``)
SINGLE_MAPS = ("abmil", "cls")

Progress = Callable[[str, float], None]
Cancel = Callable[[], bool]


class Cancelled(DismmError):
    """The caller's ``cancel()`` returned True; nothing was written."""


@dataclass
class ModelSpec:
    """What a loaded model needs as input and how to label its output."""

    kind: str
    task: str
    d_in: int
    magnifications: tuple[str, ...]
    encoder: str
    encoder_weights_hash: str | None
    patch_size: int
    class_names: list[str]
    bin_edges: list[float | None] | None
    trained_for: str
    model_id: str
    encoder_preprocessing: str | None = None


def resolve_model_dir(model: str | Path) -> Path:
    """``"demo"`` -> the shipped demo model; anything else is a model directory path."""
    if str(model) == "demo":
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise ModelConfigError("the demo model is not built yet: run `python -m training.recipes.demo_model`")
        return DEMO_MODEL_DIR
    return Path(model)


def model_spec(document: Mapping[str, Any]) -> ModelSpec:
    """Read the prediction-relevant parts of a model's config.json (see module docstring)."""
    arch = document["model"]
    kind, task = str(arch.get("kind")), str(arch.get("task", "classification"))
    mags = tuple(str(m) for m in arch.get("magnifications", ()))
    extra_mags = document.get(EXTRA_MAGNIFICATIONS)
    if extra_mags is not None and [_mag_value(m) for m in extra_mags] != [_mag_value(m) for m in mags]:
        raise ModelConfigError(f"config.json magnifications {list(extra_mags)} disagree with the architecture's {list(mags)}")
    n_out, names = int(arch.get("n_outputs", 0)), []
    if task == "classification":
        names = [str(c) for c in document.get(EXTRA_CLASS_NAMES) or []] or [f"class {i}" for i in range(n_out)]
    if task == "classification" and len(names) != n_out:
        raise ModelConfigError(f"config.json lists {len(names)} class names for a model with {n_out} outputs")
    edges = document.get(EXTRA_BIN_EDGES) if task == "survival" else None
    if edges is not None:
        edges = [None if e is None or math.isinf(float(e)) else float(e) for e in edges]
    return ModelSpec(
        kind=kind, task=task, d_in=int(arch.get("d_in", 0)), magnifications=mags,
        encoder=str(document.get(EXTRA_ENCODER) or "efficientnet-lite0"),
        encoder_weights_hash=document.get(EXTRA_ENCODER_WEIGHTS_HASH),
        patch_size=int(document.get(EXTRA_PATCH_SIZE) or DEFAULT_PATCH_SIZE), class_names=names,
        bin_edges=edges, trained_for=str(document.get(EXTRA_TRAINED_FOR) or f"{kind} {task} model"),
        model_id=str(document.get("model_id", "")),
        encoder_preprocessing=document.get("encoder_preprocessing"),
    )


def load_for_prediction(model_dir: str | Path, *, device: str = "auto") -> tuple[Any, ModelSpec]:
    """(model in eval mode on ``device``, its spec); ``model_dir`` may be ``"demo"``."""
    from napari_dismm.features.encoders.base import resolve_device
    from napari_dismm.model.checkpoint import load_model

    model, document = load_model(resolve_model_dir(model_dir), map_location=resolve_device(device))
    return model, model_spec(document)


def check_features_match(spec: ModelSpec, *, encoder: str | None, dim: int, where: str,
                         weights_hash: str | None = None, preprocessing: str | None = None) -> None:
    """Refuse features the model was not trained on (other dimension, recipe, weights or
    pixel pipeline; the rule is `features.encoders.provenance.check_same_encoder`).

    ``where`` names the source as the subject of a sentence, e.g. ``"feature file a.h5 has"``."""
    from napari_dismm.features.encoders.provenance import check_same_encoder

    expects = f"model expects {spec.encoder} features ({spec.d_in}-d)"
    if dim != spec.d_in:
        got = f"{encoder} " if encoder else ""
        raise ModelConfigError(f"{expects} but {where} {got}{dim}-d features")
    check_same_encoder(expects=expects, expected=spec.encoder, got=encoder, where=where,
                       expected_hash=spec.encoder_weights_hash, got_hash=weights_hash,
                       expected_preprocessing=spec.encoder_preprocessing, got_preprocessing=preprocessing)


# --------------------------------------------------------------------------- entry points


def predict_slide(
    *,
    slide_path: str | Path,
    model_dir: str | Path,
    out_dir: str | Path | None = None,
    device: str = "auto",
    features_dir: str | Path | None = None,
    mpp: float | None = None,
    genes: Mapping[str, Any] | None = None,
    encoder_weights: str | Path | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> Prediction:
    """Tissue -> tiling -> features (cached) -> model -> Prediction (and bundle in ``out_dir``).

    ``features_dir`` defaults to the user cache (``$NAPARI_DISMM_CACHE/features``), so
    every prediction of the same slide with the same encoder reuses its feature files.
    ``genes`` (normalised vectors ``{"tumor": ..., "tme": ...}``) only for a teacher."""
    from napari_dismm.features.cache import cache_key, cached, feature_path
    from napari_dismm.features.extract import extract_slide, resolve_encoder
    from napari_dismm.slide import open_slide
    from napari_dismm.slide.synthetic import cache_dir
    from napari_dismm.tiling import magnification_to_mpp, make_grid
    from napari_dismm.tissue import TissueParams, detect_tissue, require_tissue

    timings: dict[str, float] = {}
    started = time.perf_counter()
    slide_path = Path(slide_path)
    model, spec = load_for_prediction(model_dir, device=device)
    _refuse_without_genes(spec, genes)
    if spec.encoder == SYNTHETIC_ENCODER:
        raise ModelConfigError(
            "this model was trained on `dismm synth` features, which are generated numbers, not patches of a "
            "slide: it runs only on synthetic feature files (`dismm predict FEATURES_10x.h5 FEATURES_20x.h5 "
            "--model ...`); to predict on slides, train on features from `dismm extract`"
        )
    enc = resolve_encoder(spec.encoder, weights=encoder_weights, device=device)
    check_features_match(spec, encoder=enc.name, dim=enc.dim, where="the encoder gives",
                         weights_hash=enc.weights_hash, preprocessing=getattr(enc, "preprocessing", None))
    feat_root = Path(features_dir) if features_dir is not None else cache_dir() / "features"
    watched = _WatchedEncoder(enc, progress=progress, cancel=cancel)
    _poll(cancel)

    t0 = time.perf_counter()
    params = TissueParams()
    with open_slide(slide_path, mpp=mpp) as slide:
        info, mpp0 = slide.info, slide.require_mpp()
        mask = require_tissue(detect_tissue(slide, params=params), name=slide_path.name)
        todo = 0  # patches still to encode, for the progress fraction
        for mag in spec.magnifications:
            key = cache_key(slide_id=info.slide_id, slide_mpp=mpp0, encoder=enc.name, weights_hash=enc.weights_hash,
                            magnification=_mag_value(mag), patch_size=spec.patch_size, overlap=0,
                            tissue_params=params, min_tissue=0.25,
                            preprocessing=getattr(enc, "preprocessing", None))
            path = feature_path(feat_root, encoder=enc.name, magnification=_mag_value(mag), slide_stem=slide_path.stem)
            if not cached(path, key):
                todo += len(make_grid(slide, target_mpp=magnification_to_mpp(_mag_value(mag)),
                                      patch_size=spec.patch_size, tissue=mask))
    timings["tissue"] = time.perf_counter() - t0
    _poll(cancel)
    watched.total = todo
    _report(progress, "features", 0.0)

    t0 = watched.started = time.perf_counter()
    result = extract_slide(
        slide_path=slide_path, out_dir=feat_root, encoder=watched, magnifications=spec.magnifications,
        patch_size=spec.patch_size, tissue_params=params, batch_size=batch_size, mpp=mpp, device=device,
    )
    features_seconds = time.perf_counter() - t0
    timings["encode"] = watched.encode_seconds
    timings["read"] = watched.wait_seconds  # time the encoder waited for pixels
    timings["features_other"] = max(0.0, features_seconds - watched.encode_seconds - watched.wait_seconds)
    timings["features_reused"] = float(all(o.skipped for o in result.outputs))
    _report(progress, "features", 1.0)

    files = {_label_for(o.magnification, spec): o.path for o in result.outputs}
    prediction = _predict_from_files(
        model, spec, files, genes=genes, cancel=cancel, progress=progress, timings=timings,
        slide=(info.slide_id, slide_path.name, mpp0, tuple(info.dimensions)),
        contours=[[(float(x), float(y)) for x, y in ring] for ring in mask.outer],
    )
    timings["total"] = time.perf_counter() - started
    if out_dir is not None:
        write_bundle(prediction, out_dir)
    return prediction


def predict_features(
    *,
    features: Mapping[str | float, str | Path],
    model_dir: str | Path,
    out_dir: str | Path | None = None,
    device: str = "auto",
    genes: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> Prediction:
    """Predict from existing feature files ``{magnification: h5 path}`` (no slide pixels).

    Slide id, name, mpp and size come from the files' attributes; there is no tissue outline."""
    started = time.perf_counter()
    model, spec = load_for_prediction(model_dir, device=device)
    _refuse_without_genes(spec, genes)
    if not features:
        raise FeatureFileError("no feature file given (expected {magnification: h5 path})")
    files = {_label_for(_mag_value(mag), spec): Path(path) for mag, path in features.items()}
    timings: dict[str, float] = {}
    prediction = _predict_from_files(model, spec, files, genes=genes, cancel=cancel, progress=progress,
                                     timings=timings, slide=None, contours=[])
    timings["total"] = time.perf_counter() - started
    if out_dir is not None:
        write_bundle(prediction, out_dir)
    return prediction


def features_by_magnification(paths: Sequence[str | Path]) -> dict[float, Path]:
    """``{magnification: path}`` of feature files, from their ``target_magnification``
    attribute (for ``dismm predict a_10x.h5 a_20x.h5``)."""
    from napari_dismm.features.h5 import read_features

    found: dict[float, Path] = {}
    for path in map(Path, paths):
        mag = read_features(path).target_magnification
        if mag is None:
            raise FeatureFileError(f"{path.name} does not record its magnification (no target_magnification "
                                   "attribute); re-extract it with `dismm extract`")
        if mag in found:
            raise FeatureFileError(f"{found[mag].name} and {path.name} are both {mag:g}x features")
        found[mag] = path
    return found


# --------------------------------------------------------------------------- the model step


def _predict_from_files(model, spec: ModelSpec, files: dict[str, Path], *, genes, cancel, progress,
                        timings: dict[str, float], slide, contours) -> Prediction:
    import torch

    from napari_dismm.features.h5 import bag_footprint, check_geometry, read_features

    t0 = time.perf_counter()
    loaded, footprint = {}, {}
    for mag, path in files.items():
        ff = read_features(path)
        check_geometry(ff, where=f"feature file {Path(path).name}")
        footprint[mag] = bag_footprint(ff, where=f"feature file {Path(path).name}")
        check_features_match(spec, encoder=ff.encoder, dim=ff.dim, where=f"feature file {Path(path).name} has",
                             weights_hash=ff.encoder_weights_hash, preprocessing=ff.encoder_preprocessing)
        loaded[mag] = ff
    timings["features_io"] = time.perf_counter() - t0
    slide_id, name, mpp0, size = slide if slide is not None else _slide_from_files(loaded)
    for mag, ff in loaded.items():
        if ff.slide_id and slide_id and ff.slide_id != slide_id:
            raise FeatureFileError(f"feature file {files[mag].name} is for slide {ff.name or '?'} "
                                   f"(id {ff.slide_id[:16]}), not {name} (id {slide_id[:16]})")
    present = [m for m in spec.magnifications if m in loaded and loaded[m].n_patches > 0]
    if not present:
        raise SlideError(f"{name}: no patch with enough tissue at {', '.join(spec.magnifications)}; nothing to predict")
    _poll(cancel)
    _report(progress, "model", 0.0)

    t0 = time.perf_counter()
    dev = next(model.parameters()).device
    bags = {m: torch.from_numpy(loaded[m].features).unsqueeze(0).to(dev) for m in present}
    coords = {m: torch.from_numpy(loaded[m].coords).unsqueeze(0).to(dev) for m in present}
    gene_t = None if genes is None else {
        u: torch.as_tensor(np.asarray(v, dtype=np.float32)).reshape(1, -1).to(dev) for u, v in genes.items()}
    # each bag's own patch footprint (a 0.25 um/px slide's patches cover twice the level-0
    # pixels of a 0.5 um/px one): the same neighbour and parent rules as in training
    footprints = {m: torch.tensor([np.nan if footprint[m] is None else footprint[m]], dtype=torch.float64, device=dev)
                  for m in present}
    with torch.inference_mode():
        out = model(bags, coords=coords, genes=gene_t, footprints=footprints)
    timings["model"] = time.perf_counter() - t0
    _report(progress, "model", 1.0)

    patches = pd.concat([_patch_rows(out, m, loaded[m], spec, mpp0) for m in present], ignore_index=True)
    probabilities = predicted = risk = survival = None
    if spec.task == "classification":
        probabilities = [float(p) for p in out.probabilities[0].cpu()]
        predicted = spec.class_names[int(np.argmax(probabilities))]
    else:
        risk = float(out.risk[0])
        survival = [float(s) for s in out.survival[0].cpu()]
    return Prediction(
        slide_id=slide_id, slide_name=name, model_id=spec.model_id, model_kind=spec.kind, task=spec.task,
        class_names=list(spec.class_names), probabilities=probabilities, predicted_class=predicted, risk=risk,
        survival=survival, bin_edges=spec.bin_edges, trained_for=spec.trained_for, mpp=mpp0, level0_size=size,
        patches=patches, tissue_contours=contours, timings=timings, **_tile_counts(loaded.values()),
    )


def _patch_rows(out, mag: str, ff, spec: ModelSpec, mpp0: float | None) -> pd.DataFrame:
    """One row per patch of ``mag``. A model with a single map (ABMIL's ``"abmil"``,
    MIRROR's [CLS] attention ``"cls"``) has no subspaces: its map fills both subspace
    columns (the bundle keeps one schema and finite values; ``model_kind`` in
    prediction.json tells a reader the two columns are one map)."""
    n = ff.n_patches
    maps = {k: v[0].detach().cpu().numpy().astype(np.float64) for k, v in out.attention[mag].items()}
    single = next((maps[k] for k in SINGLE_MAPS if k in maps), None)
    tumor = maps.get("tumor", single)
    tme = maps.get("tme", single)
    if tumor is None or tme is None:
        raise ModelConfigError(f"model gives no tumor/TME attention (maps: {sorted(maps)})")
    size = ff.patch_size_level0
    if size is None:
        if mpp0 is None:
            raise FeatureFileError("feature file has neither patch_size_level0 nor an mpp to derive it from")
        size = round(spec.patch_size * (10.0 / _mag_value(mag)) / mpp0)
    ita = (out.ita or {}).get(mag)
    cluster = ita.cluster[0].cpu().numpy() if ita is not None else np.full(n, -1)
    centre = ita.is_centre[0].cpu().numpy() if ita is not None else np.zeros(n, dtype=bool)
    frame = pd.DataFrame({
        "x": ff.coords[:, 0], "y": ff.coords[:, 1], "width": np.full(n, size), "height": np.full(n, size),
        "magnification": [mag] * n, "tumor_attention": tumor[:n], "tme_attention": tme[:n],
        "ita_cluster": cluster[:n], "ita_centre": centre[:n],
    })
    return frame.loc[:, list(PATCH_COLUMNS)]


def _tile_counts(files) -> dict[str, int | None]:
    """Unreadable and read tiles summed over the feature files (None if any lacks them)."""
    files = list(files)
    if any(ff.tiles_read is None or ff.unreadable_tiles is None for ff in files):
        return {"unreadable_tiles": None, "tiles_read": None}
    return {"unreadable_tiles": sum(ff.unreadable_tiles for ff in files),
            "tiles_read": sum(ff.tiles_read for ff in files)}


def _slide_from_files(loaded: dict) -> tuple[str, str, float | None, tuple[int, int] | None]:
    ff = next(iter(loaded.values()))
    size = (int(ff.level0_width), int(ff.level0_height)) if ff.level0_width and ff.level0_height else None
    slide_id = ff.slide_id or ff.name or "unknown"
    return str(slide_id), str(ff.name or slide_id), ff.mpp, size


# --------------------------------------------------------------------------- helpers


def _refuse_without_genes(spec: ModelSpec, genes) -> None:
    if spec.kind in NEEDS_GENES and genes is None:
        raise ModelConfigError(
            f"a {spec.kind} model needs the patient's gene expression, which `dismm predict` does not take; "
            "predict from the slide alone with the WSI-only student of the same run (RUN/student/fold_k/best)"
        )


def _mag_value(mag: str | float) -> float:
    from napari_dismm.features.cache import parse_magnification

    return parse_magnification(mag)


def _label_for(value: float, spec: ModelSpec) -> str:
    """The model's own label (e.g. ``"20x"``) of a magnification value."""
    for label in spec.magnifications:
        if math.isclose(_mag_value(label), value):
            return label
    raise ModelConfigError(f"model has no {value:g}x branch (it has {', '.join(spec.magnifications)})")


def _report(progress: Progress | None, stage: str, fraction: float) -> None:
    if progress is not None:
        progress(stage, min(1.0, max(0.0, float(fraction))))


def _poll(cancel: Cancel | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("prediction cancelled")


class _WatchedEncoder:
    """An Encoder that polls ``cancel`` inside its forward pass, reports progress per batch and
    splits time into encoding and waiting for pixels (reading that overlap did not hide)."""

    def __init__(self, encoder: Any, *, progress: Progress | None, cancel: Cancel | None) -> None:
        self._encoder = encoder
        self._progress, self._cancel = progress, cancel
        self.total, self.done = 0, 0
        self.encode_seconds = self.wait_seconds = 0.0
        self.started: float | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def encode(self, batch: Any) -> Any:
        from napari_dismm.cancel_inside import polled_inside

        now = time.perf_counter()
        self.wait_seconds += now - (self.started or now)
        _poll(self._cancel)
        # cancel is polled before every layer of the forward pass: whole batches, no chunks
        with polled_inside(getattr(self._encoder, "model", None), self._cancel,
                           lambda: Cancelled("prediction cancelled")):
            out = self._encoder.encode(batch)
        self.started = time.perf_counter()
        self.encode_seconds += self.started - now
        self.done += len(batch)
        _report(self._progress, "encode", self.done / self.total if self.total else 1.0)
        return out
