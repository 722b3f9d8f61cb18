"""The prediction bundle: the file contract between ``dismm predict`` and the viewer.

A bundle is a directory holding ``prediction.json`` (every scalar of a :class:`Prediction`),
``patches.csv`` (one row per patch and magnification, the columns of :data:`PATCH_COLUMNS`)
and ``attention.geojson`` (QuPath-importable, see :mod:`napari_dismm.export`). Plain text
formats so a pathologist's other tools (QuPath, a spreadsheet) open them without us.

Writing is atomic: a new bundle directory appears complete or not at all (temp dir, then
rename); rewriting an existing directory replaces each file atomically and
``prediction.json`` records the patch count, so a torn pair is detected on reading.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_dismm import __version__
from napari_dismm.errors import DismmError, FeatureFileError

PREDICTION_JSON = "prediction.json"
PATCHES_CSV = "patches.csv"
ATTENTION_GEOJSON = "attention.geojson"
BUNDLE_FORMAT = "dismm-prediction"
BUNDLE_VERSION = 1

#: Columns of ``patches.csv`` and of ``Prediction.patches``, in this order.
PATCH_COLUMNS: tuple[str, ...] = (
    "x", "y", "width", "height", "magnification",
    "tumor_attention", "tme_attention", "ita_cluster", "ita_centre",
)
_INT_COLUMNS = ("x", "y", "width", "height", "ita_cluster")
_FLOAT_COLUMNS = ("tumor_attention", "tme_attention")
TASKS = ("classification", "survival")


class BundleError(FeatureFileError):
    """A bundle directory that is missing, malformed or inconsistent."""


@dataclass(eq=False)
class Prediction:
    """One model's prediction for one slide, with everything the viewer draws."""

    slide_id: str
    slide_name: str
    model_id: str
    model_kind: str
    task: str
    class_names: list[str]
    probabilities: list[float] | None
    predicted_class: str | None
    risk: float | None
    survival: list[float] | None
    bin_edges: list[float | None] | None
    trained_for: str
    mpp: float | None
    level0_size: tuple[int, int] | None
    patches: pd.DataFrame
    tissue_contours: list[list[tuple[float, float]]] = field(default_factory=list)
    software_version: str = __version__
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    #: Seconds per stage (``read``, ``encode``, ``model``, ...) — for benchmarks and logs.
    timings: dict[str, float] = field(default_factory=dict)
    #: Slide tiles that could not be decoded (shown to the model as background) and tiles
    #: read, summed over the feature files used; None when the files do not record them.
    unreadable_tiles: int | None = None
    tiles_read: int | None = None
    #: What the maps and the prediction cover when not the plain whole-slide grid
    #: (overlapping grid, drawn region; `napari_dismm.fine_maps`, `napari_dismm.region`).
    scope: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.patches = normalise_patches(self.patches)
        if self.level0_size is not None:
            self.level0_size = (int(self.level0_size[0]), int(self.level0_size[1]))
        self.tissue_contours = [[(float(x), float(y)) for x, y in ring] for ring in self.tissue_contours]

    @property
    def magnifications(self) -> list[str]:
        """Magnification labels present in the patch table, in first-seen order."""
        return list(dict.fromkeys(self.patches["magnification"].tolist()))

    def scalars(self) -> dict[str, Any]:
        """Every field except the patch table, JSON-ready (``+inf`` bin edge -> ``None``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "patches"}
        out["level0_size"] = list(self.level0_size) if self.level0_size is not None else None
        out["tissue_contours"] = [[[x, y] for x, y in ring] for ring in self.tissue_contours]
        if self.bin_edges is not None:
            out["bin_edges"] = [None if e is None or math.isinf(e) else float(e) for e in self.bin_edges]
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Prediction):
            return NotImplemented
        return self.scalars() == other.scalars() and self.patches.equals(other.patches)


def empty_patches() -> pd.DataFrame:
    """A patch table with the right columns and dtypes and no rows."""
    return normalise_patches(pd.DataFrame({c: [] for c in PATCH_COLUMNS}))


def normalise_patches(df: pd.DataFrame) -> pd.DataFrame:
    """Exactly :data:`PATCH_COLUMNS` with fixed dtypes, or a clear :class:`BundleError`."""
    if not isinstance(df, pd.DataFrame):
        raise BundleError(f"patches must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in PATCH_COLUMNS if c not in df.columns]
    extra = [c for c in df.columns if c not in PATCH_COLUMNS]
    if missing or extra:
        raise BundleError(f"patch table columns must be {list(PATCH_COLUMNS)}; missing {missing}, unexpected {extra}")
    out = df.loc[:, list(PATCH_COLUMNS)].reset_index(drop=True).copy()
    try:
        for c in _INT_COLUMNS:
            out[c] = pd.to_numeric(out[c], errors="raise").astype(np.int64)
        for c in _FLOAT_COLUMNS:
            out[c] = pd.to_numeric(out[c], errors="raise").astype(np.float64)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"patch table has a non-numeric value: {exc}") from None
    out["magnification"] = out["magnification"].astype(str).astype(object)
    out["ita_centre"] = _as_bool(out["ita_centre"])
    if len(out) and (out["width"].le(0).any() or out["height"].le(0).any()):
        raise BundleError("patch table has a patch with non-positive width or height")
    if not np.isfinite(out[list(_FLOAT_COLUMNS)].to_numpy()).all():
        raise BundleError("patch table has a non-finite attention value")
    return out


def _as_bool(col: pd.Series) -> pd.Series:
    if col.dtype == bool:
        return col.astype(bool)
    mapping = {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False}
    text = col.astype(str).str.strip().str.lower()
    bad = ~text.isin(list(mapping))
    if bad.any():
        raise BundleError(f"ita_centre must be true/false, got {col[bad].iloc[0]!r}")
    return text.map(mapping).astype(bool)


def _check(prediction: Prediction) -> None:
    """Internal consistency a reader relies on; a violation is a bug or a hand-edited file."""
    if prediction.task not in TASKS:
        raise BundleError(f"task must be one of {list(TASKS)}, got {prediction.task!r}")
    if prediction.task == "classification":
        probs = prediction.probabilities
        if probs is None or len(probs) != len(prediction.class_names):
            raise BundleError(
                f"classification needs one probability per class: {len(prediction.class_names)} classes, "
                f"{0 if probs is None else len(probs)} probabilities"
            )
    else:
        if prediction.risk is None or prediction.survival is None:
            raise BundleError("a survival prediction needs both risk and survival")
    for name in ("probabilities", "survival"):
        values = getattr(prediction, name)
        if values is not None and not all(math.isfinite(float(v)) for v in values):
            raise BundleError(f"{name} has a non-finite value")


class BundleMismatchError(DismmError):
    """A bundle opened against a slide it was not computed from."""


def check_bundle_matches_slide(prediction: Prediction, slide_info: Any) -> None:
    """Raise :class:`BundleMismatchError` unless the bundle was computed from this slide.

    ``slide_info``: a ``SlideInfo`` (or anything with ``slide_id``) or the id itself
    (an OpenSlide quickhash-1 or our content hash)."""
    slide_id = slide_info if isinstance(slide_info, str) else getattr(slide_info, "slide_id", None)
    if slide_id != prediction.slide_id:
        path = getattr(slide_info, "path", None)
        this = f" ({Path(path).name})" if path else ""
        raise BundleMismatchError(
            f"bundle is for slide {prediction.slide_id} ({prediction.slide_name}), not {slide_id}{this}"
        )


# --------------------------------------------------------------------------- writing


def write_bundle(prediction: Prediction, out_dir: str | os.PathLike, *, geojson: dict | None = None) -> Path:
    """Write the bundle into ``out_dir`` (created if needed) and return ``out_dir``.

    ``geojson`` defaults to :func:`napari_dismm.export.attention_geojson` of the prediction.
    """
    _check(prediction)
    out = Path(out_dir)
    if geojson is None:
        from napari_dismm.export import attention_geojson  # lazy: export imports this module

        geojson = attention_geojson(prediction)
    doc = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "n_patches": len(prediction.patches)}
    doc.update(prediction.scalars())
    try:
        payload = json.dumps(doc, indent=2, allow_nan=False)
    except ValueError:
        raise BundleError("prediction has a NaN or infinite value; refusing to write invalid JSON") from None

    if out.exists() and not out.is_dir():
        raise BundleError(f"bundle output {out} exists and is not a directory")
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    fresh = not out.exists()
    # os.mkdir, not mkdtemp: the bundle gets the user's umask (mkdtemp's 0700 would hide it
    # from colleagues on a shared server)
    tmp = (parent if fresh else out) / f".{out.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        prediction.patches.to_csv(tmp / PATCHES_CSV, index=False)
        (tmp / ATTENTION_GEOJSON).write_text(json.dumps(geojson, allow_nan=False), encoding="utf-8")
        from napari_dismm.export import write_bundle_overlays  # QuPath detections, overlay TIFFs

        overlays = write_bundle_overlays(prediction, tmp)
        (tmp / PREDICTION_JSON).write_text(payload, encoding="utf-8")
        if fresh:
            os.replace(tmp, out)
        else:  # prediction.json last: it names the patch count the CSV must match
            for name in (*overlays, PATCHES_CSV, ATTENTION_GEOJSON, PREDICTION_JSON):
                os.replace(tmp / name, out / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- reading


def is_bundle_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding ``prediction.json`` and ``patches.csv``."""
    p = Path(path)
    return p.is_dir() and (p / PREDICTION_JSON).is_file() and (p / PATCHES_CSV).is_file()


def read_bundle(path: str | os.PathLike) -> Prediction:
    """Read a bundle directory (or its ``prediction.json``); :class:`BundleError` if malformed."""
    p = Path(path)
    if p.is_file() and p.name == PREDICTION_JSON:
        p = p.parent
    if not p.is_dir():
        raise BundleError(f"{p} is not a prediction bundle directory")
    for name in (PREDICTION_JSON, PATCHES_CSV):
        if not (p / name).is_file():
            raise BundleError(f"{p} is not a complete prediction bundle: {name} is missing")
    try:
        doc = json.loads((p / PREDICTION_JSON).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{p / PREDICTION_JSON} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{p / PREDICTION_JSON} is not a dismm prediction (format must be {BUNDLE_FORMAT!r})")
    if int(doc.get("version", 0)) > BUNDLE_VERSION:
        raise BundleError(
            f"{p} was written by a newer napari-dismm (bundle version {doc['version']}); please upgrade"
        )
    try:
        patches = pd.read_csv(p / PATCHES_CSV, float_precision="round_trip", dtype={"magnification": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise BundleError(f"{p / PATCHES_CSV} is not a readable CSV ({exc})") from None
    try:
        patches = normalise_patches(patches)
    except BundleError as exc:
        raise BundleError(f"{p / PATCHES_CSV}: {exc}") from None
    if "n_patches" in doc and int(doc["n_patches"]) != len(patches):
        raise BundleError(
            f"{p} is inconsistent: prediction.json lists {doc['n_patches']} patches, patches.csv has {len(patches)}"
        )
    kwargs = _fields_from_json(doc, where=p / PREDICTION_JSON)
    try:
        pred = Prediction(patches=patches, **kwargs)
        _check(pred)
    except BundleError as exc:
        raise BundleError(f"{p}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{p / PREDICTION_JSON} has a malformed field ({exc})") from None
    return pred


_REQUIRED = ("slide_id", "slide_name", "model_id", "model_kind", "task")


def _fields_from_json(doc: dict[str, Any], *, where: Path) -> dict[str, Any]:
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise BundleError(f"{where} lacks required field(s) {missing}")
    names = {f.name for f in fields(Prediction)} - {"patches"}
    kw = {k: v for k, v in doc.items() if k in names}
    kw.setdefault("class_names", [])
    for k in ("probabilities", "predicted_class", "risk", "survival", "bin_edges", "mpp", "level0_size"):
        kw.setdefault(k, None)
    kw.setdefault("trained_for", "")
    with contextlib.suppress(TypeError):
        if kw["level0_size"] is not None:
            kw["level0_size"] = tuple(int(v) for v in kw["level0_size"])
    return kw
