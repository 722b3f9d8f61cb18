"""`extract_slide`: one slide -> one feature file per magnification.

Why it is shaped this way:
- Tissue is detected once and reused for every magnification; patches are read by
  worker threads (`iter_patch_batches`) while the encoder runs on the batch before, so
  reading and decoding overlap with the model. On CUDA the batch is pinned and copied
  without blocking, and the encoder runs under autocast.
- Reuse: each output file carries a content-addressed key (`cache.cache_key`); a file
  whose key matches is finished work and nothing is read or encoded for it. Files are
  written atomically, so a killed run leaves either the old file or none, and the re-run
  recomputes exactly what is missing. Patch order and batches are the same on every run,
  so a re-run's features equal an uninterrupted run's bit for bit (same machine, same
  torch thread count: see ``threads``).
- Cohorts (folders, lists, dask clusters) are in `features.cohort`.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_dismm.errors import DismmError, DismmWarning, SlideError
from napari_dismm.features.cache import (
    cache_key,
    cached,
    feature_path,
    magnification_label,
    parse_magnification,
    tissue_params_dict,
)
from napari_dismm.features.h5 import FeatureFile, read_coords, write_features

DEFAULT_MAGNIFICATIONS: tuple[str, ...] = ("10x", "20x")
#: Above this share of unreadable (corrupt) slide tiles, no feature file is written: the
#: patches would be mostly background and a prediction from them meaningless.
MAX_UNREADABLE_SHARE = 0.05


@dataclass(frozen=True)
class MagnificationResult:
    """One feature file: where it is, how many patches, and whether it was reused."""

    magnification: float
    path: Path
    n_patches: int
    skipped: bool
    seconds: float


@dataclass(frozen=True)
class SlideResult:
    """What `extract_slide` did for one slide (one output per magnification)."""

    slide: Path
    slide_id: str
    outputs: tuple[MagnificationResult, ...]
    seconds: float

    @property
    def skipped(self) -> bool:
        """True when every file was already there with the same key (no work was done)."""
        return all(o.skipped for o in self.outputs)

    @property
    def n_patches(self) -> int:
        return sum(o.n_patches for o in self.outputs)


# ----------------------------------------------------------------------------- one slide


def extract_slide(
    *,
    slide_path: str | Path,
    out_dir: str | Path,
    encoder: Any = "efficientnet-lite0",
    weights: str | Path | None = None,
    magnifications: Sequence[str | float] = DEFAULT_MAGNIFICATIONS,
    patch_size: int = 224,
    overlap: int = 0,
    tissue_params: Any = None,
    min_tissue: float = 0.25,
    batch_size: int | None = None,
    num_workers: int = 2,
    mpp: float | None = None,
    device: str = "auto",
    threads: int | None = None,
    progress: bool = False,
) -> SlideResult:
    """Write ``out_dir/<encoder>/<mag>x/<slide stem>.h5`` for each magnification.

    ``encoder`` is a registry name (built once per process, with ``weights`` and
    ``device``) or a ready `Encoder`. Files already written with the same content key
    are kept and reported with ``skipped=True``. ``threads`` fixes torch's CPU threads
    while encoding: CPU features are bit-identical between runs with the same thread
    count (and batch size), and differ in the last float bits (~1e-6) otherwise.
    """
    from napari_dismm.slide import open_slide
    from napari_dismm.tiling import magnification_to_mpp, make_grid
    from napari_dismm.tissue import TissueParams, detect_tissue, require_tissue

    started = time.perf_counter()
    slide_path = Path(slide_path)
    mags = _unique_magnifications(magnifications)
    if batch_size is not None and batch_size < 1:
        raise DismmError(f"batch size must be >= 1, got {batch_size}")
    enc = resolve_encoder(encoder, weights=weights, device=device)
    batch_size = enc.batch_size(batch_size)  # None: 64 on the CPU, sized to a GPU's free memory
    params = _tissue_params(tissue_params, TissueParams)
    with open_slide(slide_path, mpp=mpp) as slide:
        info = slide.info
        mpp0 = slide.require_mpp()
        _check_fits(slide_path, info.level_dimensions[0], mpp0=mpp0, mags=mags, patch_size=patch_size)
        plans = []
        for mag in mags:
            key = cache_key(
                slide_id=info.slide_id, slide_mpp=mpp0, encoder=enc.name, weights_hash=enc.weights_hash,
                magnification=mag, patch_size=patch_size, overlap=overlap, tissue_params=params,
                min_tissue=min_tissue, preprocessing=getattr(enc, "preprocessing", None),
            )
            path = feature_path(out_dir, encoder=enc.name, magnification=mag, slide_stem=slide_path.stem)
            plans.append((mag, key, path))
        outputs: list[MagnificationResult] = []
        mask = None
        for mag, key, path in plans:
            t0 = time.perf_counter()
            if cached(path, key):
                outputs.append(MagnificationResult(mag, path, len(read_coords(path)), True, 0.0))
                continue
            bad_before, read_before = slide.tile_counts()
            if mask is None:  # once per slide, shared by the magnifications
                mask = require_tissue(detect_tissue(slide, params=params), name=slide_path.name)
            grid = make_grid(
                slide, target_mpp=magnification_to_mpp(mag), patch_size=patch_size, overlap=overlap,
                tissue=mask, min_tissue=min_tissue,
            )
            if len(grid) == 0:
                warnings.warn(
                    f"{slide_path.name}: no {magnification_label(mag)} patch has {min_tissue:.0%} tissue; "
                    "writing an empty feature file",
                    DismmWarning,
                    stacklevel=2,
                )
            desc = f"{slide_path.stem[:24]} {magnification_label(mag)}"
            with torch_threads(threads):
                features = encode_grid(
                    slide, grid, enc, batch_size=batch_size, num_workers=num_workers, progress=progress, desc=desc
                )
            bad_now, read_now = slide.tile_counts()
            bad, read = bad_now - bad_before, read_now - read_before
            check_unreadable(slide_path.name, bad, read)
            w0, h0 = info.level_dimensions[0]
            write_features(
                path,
                FeatureFile(
                    features=features, coords=grid.coords, patch_size=grid.patch_size,
                    patch_size_level0=grid.patch_size_level0, target_magnification=mag,
                    level0_magnification=10.0 / mpp0, overlap=grid.overlap, name=slide_path.stem,
                    level0_width=int(w0), level0_height=int(h0), mpp=mpp0, encoder=enc.name,
                    encoder_weights_hash=enc.weights_hash, slide_id=info.slide_id,
                    encoder_preprocessing=getattr(enc, "preprocessing", None),
                    tissue_params=tissue_params_dict(params), min_tissue=min_tissue, cache_key=key,
                    unreadable_tiles=bad, tiles_read=read,
                ),
            )
            outputs.append(MagnificationResult(mag, path, len(grid), False, time.perf_counter() - t0))
        slide_id = info.slide_id
    return SlideResult(slide_path, slide_id, tuple(outputs), time.perf_counter() - started)


def check_unreadable(name: str, bad: int, read: int) -> None:
    """SlideError when more than :data:`MAX_UNREADABLE_SHARE` of the tiles read were corrupt."""
    if read and bad / read > MAX_UNREADABLE_SHARE:
        raise SlideError(f"{name}: {bad} of {read} tiles read are unreadable (corrupt), more than "
                         f"{MAX_UNREADABLE_SHARE:.0%}; features would be mostly background, so none are written")


def encode_grid(
    slide: Any,
    grid: Any,
    encoder: Any,
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    progress: bool = False,
    desc: str | None = None,
) -> np.ndarray:
    """(N, dim) float32 features of every patch of ``grid``; the next batches are read
    by ``num_workers`` threads while the encoder runs on this one."""
    import torch
    from tqdm.auto import tqdm

    from napari_dismm.tiling import iter_patch_batches

    out = np.empty((len(grid), encoder.dim), dtype=np.float32)
    pin = encoder.device.type == "cuda"
    with tqdm(total=len(grid), unit="patch", desc=desc, disable=not progress, leave=False) as bar:
        for indices, patches in iter_patch_batches(slide, grid, batch_size=batch_size, num_workers=num_workers):
            batch = torch.from_numpy(patches)
            if pin:
                batch = batch.pin_memory()  # lets the host->device copy run without blocking
            out[indices] = encoder.encode(batch).numpy()
            bar.update(len(indices))
    return out


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with torch using ``threads`` CPU threads (None: leave as is), then restore."""
    if threads is None:
        yield
        return
    import torch

    if threads < 1:
        raise DismmError(f"threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=4)
def _registry_encoder(name: str, weights: str | None, device: str, stamp: int | None) -> Any:
    """``stamp`` (the weight file's mtime) is only part of the cache key: a replaced file
    is loaded again, with its new hash."""
    from napari_dismm.features.encoders import get_encoder

    return get_encoder(name, weights=weights, device=device)


def resolve_encoder(encoder: Any, *, weights: str | Path | None, device: str) -> Any:
    """A ready Encoder passes through; a name is built once per process (cohort workers)."""
    if isinstance(encoder, str):
        stamp = None
        if weights is not None and Path(weights).is_file():
            stamp = Path(weights).stat().st_mtime_ns
        return _registry_encoder(encoder, None if weights is None else str(weights), str(device), stamp)
    if not (hasattr(encoder, "encode") and hasattr(encoder, "weights_hash")):
        raise DismmError(f"encoder must be a name or an Encoder, got {type(encoder).__name__}")
    return encoder


def _tissue_params(value: Any, cls: type) -> Any:
    """None -> defaults; a dict (from a config file or the command line) -> the dataclass."""
    if value is None:
        return cls()
    if isinstance(value, dict):
        try:
            return cls(**value)
        except TypeError as error:
            raise DismmError(f"bad tissue parameters: {error}") from None
    return value


def check_options(*, magnifications: Sequence[str | float] = DEFAULT_MAGNIFICATIONS, mpp: float | None = None,
                  min_tissue: float = 0.25, batch_size: int | None = None, num_workers: int = 2, patch_size: int = 224,
                  overlap: int = 0, threads: int | None = None, **_: Any) -> None:
    """Numeric options that would fail every slide, refused once before any slide (or the
    output folder) is touched; messages name the `dismm extract` flag."""
    import math

    from napari_dismm.slide.info import check_user_mpp

    try:
        _unique_magnifications(magnifications)
    except DismmError as error:
        raise DismmError(f"--magnifications: {error}") from None
    try:
        check_user_mpp(mpp)
    except DismmError:
        raise DismmError(f"--mpp must be a positive number of µm per pixel, got {mpp!r}") from None
    if isinstance(min_tissue, bool) or not isinstance(min_tissue, (int, float)) or not (
            math.isfinite(min_tissue) and 0.0 <= min_tissue <= 1.0):
        raise DismmError(f"--min-tissue is a fraction of the patch, from 0 to 1; got {min_tissue!r}")
    for flag, value, lowest in (("--batch-size", 1 if batch_size is None else batch_size, 1),
                                ("--workers", num_workers, 0), ("patch size", patch_size, 1), ("overlap", overlap, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise DismmError(f"{flag} must be an integer >= {lowest}, got {value!r}")
    if overlap >= patch_size:
        raise DismmError(f"overlap ({overlap}) must be smaller than the patch size ({patch_size})")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise DismmError(f"threads must be an integer >= 1, got {threads!r}")


def _unique_magnifications(values: Sequence[str | float]) -> list[float]:
    mags: list[float] = []
    for value in values:
        mag = parse_magnification(value)
        if mag not in mags:
            mags.append(mag)
    if not mags:
        raise DismmError("no magnification given (e.g. 10 20)")
    return mags


def _check_fits(path: Path, size: Sequence[int], *, mpp0: float, mags: list[float], patch_size: int) -> None:
    """A slide smaller than one patch is a clear error before tissue detection runs."""
    w0, h0 = int(size[0]), int(size[1])
    for mag in mags:
        patch0 = max(1, round(patch_size * (10.0 / mag) / mpp0))
        if patch0 > w0 or patch0 > h0:
            raise SlideError(
                f"{path.name}: slide of {w0} x {h0} px is smaller than one {patch_size} px patch at "
                f"{magnification_label(mag)} ({patch0} px at level 0, {mpp0:g} µm/px)"
            )


_COHORT_NAMES = {"extract_cohort", "collect_slides", "CohortSummary", "SlideFailure"}


def __getattr__(name: str) -> Any:
    """`extract_cohort` and friends live in `features.cohort`; reachable from here too."""
    if name in _COHORT_NAMES:
        from napari_dismm.features import cohort

        return getattr(cohort, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
