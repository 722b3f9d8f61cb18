"""Where feature files go and when one already on disk can be reused.

Layout: ``OUT/<encoder>/<magnification>/<slide stem>.h5`` (e.g. ``OUT/efficientnet-lite0/
20x/TCGA-XX.h5``): human-readable, one folder per magnification, so a cohort CSV's
``features_10x`` / ``features_20x`` columns point straight at the files.

Reuse is content-addressed: the key is the sha256 of a canonical JSON of everything the
features depend on (slide quickhash and level-0 mpp, encoder name and weights hash,
magnification, patch size, overlap, tissue parameters, minimum tissue fraction, format
version, and the encoder's pixel pipeline when it has one). It is stored as the file's ``cache_key`` attribute; a file whose key matches is
finished work, anything else (other tissue parameters, other weights, a replaced slide
under the same name) is recomputed and atomically replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from napari_dismm.errors import DismmError
from napari_dismm.features.h5 import FORMAT_VERSION, read_root_attrs


def parse_magnification(value: str | float | int) -> float:
    """``"20x"``, ``"20"``, ``20`` or ``20.0`` -> 20.0; rejects anything else with one line."""
    text = str(value).strip().lower().removesuffix("x").strip()
    try:
        mag = float(text)
    except ValueError:
        raise DismmError(f"magnification {value!r} is not a number like 10, 20 or '20x'") from None
    if not math.isfinite(mag) or not 0.0 < mag <= 200.0:
        raise DismmError(f"magnification {value!r} must be in (0, 200]")
    return mag


def magnification_label(mag: float) -> str:
    """20.0 -> ``"20x"``, 2.5 -> ``"2.5x"`` (folder names and log lines)."""
    return f"{mag:g}x"


def tissue_params_dict(params: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (dataclass) tissue-parameter object, or of a plain dict."""
    if params is None:
        return {}
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        return dataclasses.asdict(params)
    if isinstance(params, dict):
        return dict(params)
    raise TypeError(f"tissue parameters must be a dataclass or a dict, got {type(params).__name__}")


def cache_key(
    *,
    slide_id: str,
    slide_mpp: float,
    encoder: str,
    weights_hash: str,
    magnification: float,
    patch_size: int,
    overlap: int,
    tissue_params: Any,
    min_tissue: float,
    preprocessing: str | None = None,
) -> str:
    """sha256 hex of the canonical description of one feature file's content.

    ``preprocessing`` (the encoder's pixel pipeline) enters only when given, so keys of
    files written before it was recorded stay valid."""
    payload = {
        "format": FORMAT_VERSION,
        "slide_id": str(slide_id),
        "slide_mpp": float(slide_mpp),
        "encoder": str(encoder),
        "weights_hash": str(weights_hash),
        "magnification": float(magnification),
        "patch_size": int(patch_size),
        "overlap": int(overlap),
        "tissue": tissue_params_dict(tissue_params),
        "min_tissue": float(min_tissue),
    }
    if preprocessing is not None:
        payload["preprocessing"] = str(preprocessing)
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def feature_path(out_dir: str | Path, *, encoder: str, magnification: float, slide_stem: str) -> Path:
    """``out_dir/<encoder>/<mag>x/<slide_stem>.h5``, path-safe."""
    return Path(out_dir) / _safe(encoder) / magnification_label(magnification) / f"{_safe(slide_stem)}.h5"


def cached(path: str | Path, key: str) -> bool:
    """True if ``path`` is a complete feature file written with exactly this ``key``."""
    path = Path(path)
    if not path.is_file():
        return False
    return read_root_attrs(path).get("cache_key") == key


def _safe(name: str) -> str:
    """Keep names readable but never a path separator or a leading dot."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".")
    return cleaned or "_"
