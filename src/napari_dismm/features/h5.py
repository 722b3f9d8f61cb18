"""Feature files: one slide, one magnification, in the CLAM / TRIDENT h5 layout.

Why this layout: it is what the tools of the field (CLAM, TRIDENT, STAMP) read and
write, so features made here train elsewhere and theirs train here. The contract
(DESIGN.md): ``features`` (N, D) float32, ``coords`` (N, 2) int64 level-0 top-left
(x, y); TRIDENT's attributes on ``coords`` plus CLAM's ``patch_level`` / ``downsample``;
``encoder`` / ``name`` on ``features``; our provenance (slide quickhash, weights hash,
mpp, tissue parameters, cache key) on the file's root.

CLAM's ``patch_level`` and ``downsample`` are written as ``0`` and the level-0 size of a
patch over its size at the target magnification, so that CLAM's rule ``patch_size x
downsample`` gives the level-0 footprint whatever pyramid level was actually read.

Writes are atomic (a temp file in the same directory, then ``os.replace``): a crash or a
kill never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from napari_dismm.errors import DataError, FeatureFileError

#: bumped when the meaning of what we write changes (also part of the cache key)
FORMAT_VERSION = 1
_TMP_SUFFIX = ".tmp"


@dataclass
class FeatureFile:
    """Patch features of one slide at one magnification, with where they came from."""

    features: np.ndarray
    """(N, D) float32."""
    coords: np.ndarray
    """(N, 2) int64, level-0 top-left (x, y)."""
    patch_size: int | None = None
    """Patch side in pixels at the target magnification."""
    patch_size_level0: int | None = None
    """Patch side in level-0 pixels (the footprint on the slide)."""
    target_magnification: float | None = None
    level0_magnification: float | None = None
    overlap: int = 0
    """Overlap between neighbouring patches, in pixels at the target magnification."""
    name: str | None = None
    """Slide name (file stem)."""
    level0_width: int | None = None
    level0_height: int | None = None
    mpp: float | None = None
    """Level-0 microns per pixel used for the grid."""
    encoder: str | None = None
    encoder_weights_hash: str | None = None
    encoder_preprocessing: str | None = None
    """The encoder's pixel pipeline and output rule (``Encoder.preprocessing``)."""
    slide_id: str | None = None
    """Slide quickhash (content hash, not the file name)."""
    tissue_params: dict[str, Any] | None = None
    min_tissue: float | None = None
    cache_key: str | None = None
    unreadable_tiles: int | None = None
    """Native slide tiles that could not be decoded (read as background) while making the file."""
    tiles_read: int | None = None
    """Native slide tiles read while making the file (the denominator of the above)."""
    source_format: str = "dismm"
    """How the file was recognised on reading: dismm, trident, clam or bare."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other attributes found on reading (kept, never interpreted)."""

    def __post_init__(self) -> None:
        self.features, self.coords = _check_arrays(self.features, self.coords, where="feature file")

    @property
    def n_patches(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


# ----------------------------------------------------------------------------- writing


def write_features(path: str | os.PathLike, ff: FeatureFile) -> Path:
    """Write ``ff`` to ``path`` atomically; returns the final path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            _write_into(h5, ff)
    return path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it over ``path``, else delete it.

    The temp name carries host and pid so stale temps of killed runs can be told from
    live ones and cleaned up by the next successful write.
    """
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _remove_stale_temps(path)


def _remove_stale_temps(path: Path) -> None:
    """Delete temps of ``path`` left by killed writers on this host (their pid is gone)."""
    host = socket.gethostname()
    for tmp in path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"):
        parts = tmp.name[len(path.name) + 2 :].split(".")
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
            continue
        if not _pid_alive(int(parts[1])):
            tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_into(h5: h5py.File, ff: FeatureFile) -> None:
    feats = h5.create_dataset("features", data=ff.features, dtype=np.float32)
    coords = h5.create_dataset("coords", data=ff.coords, dtype=np.int64)
    # TRIDENT's attributes on coords
    _set(coords.attrs, "patch_size", ff.patch_size)
    _set(coords.attrs, "patch_size_level0", ff.patch_size_level0)
    _set(coords.attrs, "level0_magnification", _mag_attr(ff.level0_magnification))
    _set(coords.attrs, "target_magnification", _mag_attr(ff.target_magnification))
    coords.attrs["overlap"] = int(ff.overlap)
    _set(coords.attrs, "name", ff.name)
    _set(coords.attrs, "level0_width", ff.level0_width)
    _set(coords.attrs, "level0_height", ff.level0_height)
    # CLAM's: patch_size x downsample = level-0 footprint
    coords.attrs["patch_level"] = 0
    if ff.patch_size and ff.patch_size_level0:
        ds = float(ff.patch_size_level0) / float(ff.patch_size)
        coords.attrs["downsample"] = np.array([ds, ds], dtype=np.float64)
    _set(coords.attrs, "mpp", ff.mpp)
    # features: encoder and slide name
    _set(feats.attrs, "encoder", ff.encoder)
    _set(feats.attrs, "name", ff.name)
    # provenance on the root
    root = h5.attrs
    root["dismm_format"] = FORMAT_VERSION
    _set(root, "slide_id", ff.slide_id)
    _set(root, "encoder", ff.encoder)
    _set(root, "encoder_weights_hash", ff.encoder_weights_hash)
    _set(root, "encoder_preprocessing", ff.encoder_preprocessing)
    _set(root, "mpp", ff.mpp)
    if ff.tissue_params is not None:
        root["tissue_params"] = json.dumps(ff.tissue_params, sort_keys=True)
    _set(root, "min_tissue", ff.min_tissue)
    _set(root, "cache_key", ff.cache_key)
    _set(root, "unreadable_tiles", ff.unreadable_tiles)
    _set(root, "tiles_read", ff.tiles_read)


def _set(attrs: h5py.AttributeManager, key: str, value: Any) -> None:
    if value is not None:
        attrs[key] = value


def _mag_attr(mag: float | None) -> int | float | None:
    """TRIDENT writes magnifications as integers; keep fractional ones (e.g. 2.5x) exact."""
    if mag is None:
        return None
    return int(mag) if float(mag).is_integer() else float(mag)


# ----------------------------------------------------------------------------- reading


def _open_feature_file(path: Path) -> h5py.File:
    """The open h5 file at ``path`` with its ``features`` and ``coords`` datasets checked."""
    if not path.is_file():
        raise FeatureFileError(f"feature file not found: {path}")
    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        raise FeatureFileError(f"not a readable h5 feature file: {path} ({error})") from None
    for key in ("features", "coords"):
        if key not in h5 or not isinstance(h5[key], h5py.Dataset):
            found = ", ".join(sorted(h5.keys())) or "nothing"
            h5.close()
            raise FeatureFileError(f"{path}: no '{key}' dataset (found {found})")
    return h5


def read_features(path: str | os.PathLike) -> FeatureFile:
    """Read a feature file written here, by TRIDENT or by CLAM (or bare features + coords)."""
    path = Path(path)
    with _open_feature_file(path) as h5:
        features = h5["features"][()]
        coords = h5["coords"][()]
        c_attrs = _attrs(h5["coords"].attrs)
        f_attrs = _attrs(h5["features"].attrs)
        r_attrs = _attrs(h5.attrs)
    features, coords = _check_arrays(features, coords, where=str(path))
    return _interpret(features, coords, c_attrs, f_attrs, r_attrs)


def scan_features(path: str | os.PathLike, *, rows_per_read: int = 4096) -> tuple[int, int]:
    """(N, D) of a feature file after every check ``read_features`` and ``check_geometry``
    make, reading the features in blocks of rows so a cohort is checked in bounded memory.
    Why: a training run must refuse a broken file before it writes anything, not when the
    file's bag is first loaded mid-fold."""
    path = Path(path)
    with _open_feature_file(path) as h5:
        data = h5["features"]
        shape = data.shape[1:] if data.ndim == 3 and data.shape[0] == 1 else data.shape
        if len(shape) != 2:
            raise FeatureFileError(f"{path}: features must be (N, D), got shape {data.shape}")
        if data.dtype.kind not in "fiu":
            raise FeatureFileError(f"{path}: features must be numeric, got dtype {data.dtype}")
        coords = _as_coords(h5["coords"][()], where=str(path))
        n, d = int(shape[0]), int(shape[1])
        if coords.shape[0] != n:
            raise FeatureFileError(f"{path}: {n} feature rows but {coords.shape[0]} coordinates")
        if data.dtype.kind == "f":
            for start in range(0, n, rows_per_read):
                rows = slice(start, start + rows_per_read)
                block = data[0, rows] if data.ndim == 3 else data[rows]
                finite = np.isfinite(block)
                if not finite.all():
                    raise FeatureFileError(f"{path}: feature row {start + int(np.flatnonzero(~finite.all(axis=1))[0])} "
                                           "contains NaN or infinity")
        c_attrs = _attrs(h5["coords"].attrs)
        r_attrs = _attrs(h5.attrs)
    shell = _interpret(np.zeros((n, 0), np.float32), coords, c_attrs, {}, r_attrs)
    check_geometry(shell, where=str(path))
    bag_footprint(shell, where=str(path))  # off the lattice of its footprint: refused before training
    return n, d


def read_coords(path: str | os.PathLike) -> np.ndarray:
    """Only the (N, 2) int64 coordinates (cheap: the features are not read)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            coords = np.asarray(h5["coords"][()])
    except (OSError, KeyError) as error:
        raise FeatureFileError(f"cannot read coords from {path}: {error}") from None
    return _as_coords(coords, where=str(path))


def read_root_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The file's root attributes (provenance) without reading any dataset; {} if unreadable."""
    try:
        with h5py.File(path, "r") as h5:
            if "features" not in h5 or "coords" not in h5:
                return {}
            return _attrs(h5.attrs)
    except OSError:
        return {}


def _attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, np.ndarray) and value.dtype.kind in "SO":
            value = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value.tolist()]
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def _interpret(
    features: np.ndarray,
    coords: np.ndarray,
    c_attrs: dict[str, Any],
    f_attrs: dict[str, Any],
    r_attrs: dict[str, Any],
) -> FeatureFile:
    """TRIDENT attributes first, then CLAM's, then nothing."""
    patch_size = _int_or_none(c_attrs.get("patch_size"))
    psl0 = _int_or_none(c_attrs.get("patch_size_level0"))
    if "dismm_format" in r_attrs:
        source = "dismm"
    elif psl0 is not None:
        source = "trident"
    elif patch_size is not None or "patch_level" in c_attrs:
        source = "clam"
        psl0 = _clam_level0_size(patch_size, c_attrs)
    else:
        source = "bare"
    tissue = r_attrs.get("tissue_params")
    known = {
        "patch_size", "patch_size_level0", "level0_magnification", "target_magnification",
        "overlap", "name", "level0_width", "level0_height", "patch_level", "downsample", "mpp",
    }
    extra = {f"coords.{k}": v for k, v in c_attrs.items() if k not in known}
    extra.update({f"features.{k}": v for k, v in f_attrs.items() if k not in {"encoder", "name"}})
    return FeatureFile(
        features=features,
        coords=coords,
        patch_size=patch_size,
        patch_size_level0=psl0,
        target_magnification=_float_or_none(c_attrs.get("target_magnification")),
        level0_magnification=_float_or_none(c_attrs.get("level0_magnification")),
        overlap=_int_or_none(c_attrs.get("overlap")) or 0,
        name=_str_or_none(c_attrs.get("name", f_attrs.get("name"))),
        level0_width=_int_or_none(c_attrs.get("level0_width")),
        level0_height=_int_or_none(c_attrs.get("level0_height")),
        mpp=_float_or_none(r_attrs.get("mpp", c_attrs.get("mpp"))),
        encoder=_str_or_none(f_attrs.get("encoder", r_attrs.get("encoder"))),
        encoder_weights_hash=_str_or_none(r_attrs.get("encoder_weights_hash")),
        encoder_preprocessing=_str_or_none(r_attrs.get("encoder_preprocessing")),
        slide_id=_str_or_none(r_attrs.get("slide_id")),
        tissue_params=json.loads(tissue) if isinstance(tissue, str) else None,
        min_tissue=_float_or_none(r_attrs.get("min_tissue")),
        cache_key=_str_or_none(r_attrs.get("cache_key")),
        unreadable_tiles=_int_or_none(r_attrs.get("unreadable_tiles")),
        tiles_read=_int_or_none(r_attrs.get("tiles_read")),
        source_format=source,
        extra=extra,
    )


def _clam_level0_size(patch_size: int | None, c_attrs: dict[str, Any]) -> int | None:
    """CLAM: patch_size is at ``patch_level``; times that level's downsample gives level 0."""
    if patch_size is None:
        return None
    ds = c_attrs.get("downsample")
    if ds is None:
        return patch_size if _int_or_none(c_attrs.get("patch_level")) == 0 else None
    ds_arr = np.asarray(ds, dtype=np.float64).ravel()
    if ds_arr.size == 0 or not np.isfinite(ds_arr[0]) or ds_arr[0] <= 0:
        return None
    return int(round(patch_size * float(ds_arr[0])))


# ----------------------------------------------------------------------------- checks


def _check_arrays(features: Any, coords: Any, *, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Shapes and dtypes of the contract; foreign dtypes (float16, int32) are cast."""
    features = np.asarray(features)
    if features.ndim == 3 and features.shape[0] == 1:  # a bag saved with a batch axis
        features = features[0]
    if features.ndim != 2:
        raise FeatureFileError(f"{where}: features must be (N, D), got shape {features.shape}")
    if features.dtype.kind not in "fiu":
        raise FeatureFileError(f"{where}: features must be numeric, got dtype {features.dtype}")
    features = np.ascontiguousarray(features, dtype=np.float32)
    coords = _as_coords(coords, where=where)
    if coords.shape[0] != features.shape[0]:
        raise FeatureFileError(
            f"{where}: {features.shape[0]} feature rows but {coords.shape[0]} coordinates"
        )
    if features.size and not np.isfinite(features).all():
        bad = int((~np.isfinite(features)).any(axis=1).sum())
        raise FeatureFileError(f"{where}: {bad} feature rows contain NaN or infinity")
    return features, coords


def check_geometry(ff: FeatureFile, *, where: str) -> None:
    """Coordinates a slide can have: not negative, no patch twice, inside the recorded
    level-0 size. A file that breaks these was not made by a tiler (or was edited), and a
    bundle drawn from it would put attention where no patch was."""
    coords = ff.coords
    if not len(coords):
        return
    if (coords < 0).any():
        bad = int((coords < 0).any(axis=1).sum())
        lowest = coords.min(axis=0).tolist()
        raise FeatureFileError(f"{where}: {bad} patch(es) at negative coordinates (lowest x, y: {lowest})")
    unique = len(np.unique(coords, axis=0))
    if unique < len(coords):
        raise FeatureFileError(
            f"{where}: {len(coords) - unique} of {len(coords)} patches repeat another patch's coordinates"
        )
    if ff.level0_width and ff.level0_height:
        outside = (coords[:, 0] >= ff.level0_width) | (coords[:, 1] >= ff.level0_height)
        if outside.any():
            raise FeatureFileError(
                f"{where}: {int(outside.sum())} patch(es) start outside the slide's "
                f"{ff.level0_width} x {ff.level0_height} px"
            )


def lattice_step(coords: np.ndarray) -> int | None:
    """The smallest positive gap between patch positions along x or y (the grid step of a
    tiled slide); None when no two patches differ (fewer than two distinct positions)."""
    coords = np.asarray(coords)
    gaps = [np.diff(np.unique(coords[:, axis])) for axis in (0, 1)] if len(coords) else []
    gaps = np.concatenate(gaps) if gaps else np.zeros(0)
    gaps = gaps[gaps > 0]
    return int(gaps.min()) if gaps.size else None


def bag_footprint(ff: FeatureFile, *, where: str) -> float | None:
    """The patch side of this bag in level-0 pixels: the file's ``patch_size_level0``, else
    the lattice step of its coordinates; None when neither is known (fewer than two
    distinct positions and no attribute).

    Why per bag: a cohort mixes scanners (0.25 and 0.5 um/px), so the same magnification
    covers 896 or 448 level-0 pixels per 224-px patch; a model that looks up neighbours or
    10x parents with one cohort-wide size silently finds none on the other scanner.
    The coordinates must lie on the lattice this footprint implies (its step minus the
    file's overlap): off-lattice patches would make neighbours and parents garbage, so
    they are refused with one line naming the file (DataError)."""
    declared = ff.patch_size_level0
    if declared is not None and declared <= 0:
        raise DataError(f"{where}: patch_size_level0 = {declared} is not a patch size")
    stride = declared
    if declared is not None and ff.overlap and ff.patch_size:
        stride = declared - int(round(ff.overlap * declared / ff.patch_size))
    if declared is None:
        stride = lattice_step(ff.coords)
        if stride is None:
            return None
    if stride <= 0:
        raise DataError(f"{where}: overlap {ff.overlap} px is not smaller than the patch ({ff.patch_size} px)")
    off = off_lattice(ff.coords, stride)
    if off:
        said = (f"the declared footprint (patch_size_level0 = {declared}" +
                (f", overlap {ff.overlap}" if stride != declared else "") + ")") if ff.patch_size_level0 else \
            "their own smallest gap (no patch_size_level0 in the file)"
        raise DataError(f"{where}: {off} of {len(ff.coords)} patches are not on the {stride}-px lattice of {said}; "
                        "neighbours and 10x parents would be wrong")
    return float(declared if declared is not None else stride)


def off_lattice(coords: np.ndarray, step: float, *, tolerance: float | None = None) -> int:
    """How many patches lie off the lattice of ``step`` anchored at the lowest x and y
    (tolerance: 1 px or 1 % of the step, for tilers that round each position)."""
    coords = np.asarray(coords, dtype=np.float64)
    if not len(coords):
        return 0
    tol = max(1.0, 0.01 * step) if tolerance is None else tolerance
    rest = np.mod(coords - coords.min(axis=0), step)
    return int((np.minimum(rest, step - rest) > tol).any(axis=1).sum())


def _as_coords(coords: Any, *, where: str) -> np.ndarray:
    coords = np.asarray(coords)
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if coords.ndim == 1 and coords.size == 0:
        coords = coords.reshape(0, 2)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise FeatureFileError(f"{where}: coords must be (N, 2) level-0 (x, y), got shape {coords.shape}")
    if coords.dtype.kind == "f":
        if coords.size and not (np.isfinite(coords).all() and (coords == np.round(coords)).all()):
            raise FeatureFileError(f"{where}: coords must be whole pixel positions")
    elif coords.dtype.kind not in "iu":
        raise FeatureFileError(f"{where}: coords must be integers, got dtype {coords.dtype}")
    return np.ascontiguousarray(coords, dtype=np.int64)


def _int_or_none(value: Any) -> int | None:
    if value is None:
        return None
    arr = np.asarray(value).ravel()
    if arr.size == 0 or arr.dtype.kind not in "iuf" or not np.isfinite(arr[0]):
        return None
    return int(round(float(arr[0])))


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    arr = np.asarray(value).ravel()
    if arr.size == 0 or arr.dtype.kind not in "iuf" or not np.isfinite(arr[0]):
        return None
    return float(arr[0])


def _str_or_none(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)
