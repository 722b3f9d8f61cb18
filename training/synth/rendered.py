"""The planted synthetic cohort rendered as slides, so slide -> features -> model is trained end to end.

Why a second synthetic cohort: :mod:`training.synth.layout` plants its signal directly in
feature space, which tests the training code but not whether the real encoder sees the
signal in pixels. Here each patient's hidden states (``tumor_state``, ``tme_state``; label
``2 * tumor + tme`` as in ``synth.layout``) drive the sample-slide generator's appearance
(:func:`napari_dismm.slide.synthetic.state_appearance`), the slides go through
:func:`napari_dismm.features.extract_cohort` with the real encoder, and the expression
table comes from ``synth.layout``'s own generator over the shipped default gene sets.

Layout of ``out_dir`` (everything is cached: a second call only fills what is missing)::

    slides/<slide>.tif (+ .regions.npz)   features/<encoder>/<10x|20x>/<slide>.h5
    cohort.csv  expression.tsv  sets.gmt  truth.csv  planted/<slide>.csv

``planted/<slide>.csv`` labels every extracted patch (x, y, magnification) with the
planted class at its centre (:func:`patch_regions`), the ground truth for attention.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from napari_dismm.errors import DataError
from napari_dismm.features.h5 import read_features
from napari_dismm.omics import load_gene_sets
from napari_dismm.slide.synthetic import (
    CLASS_NAMES as REGION_CLASSES,
    SampleSlide,
    load_sample_slide,
    sidecar_path,
    state_appearance,
    write_sample_slide,
)
from training.synth.layout import CLASS_NAMES, SynthConfig, _expression, _survival, class_of

MAGNIFICATIONS = ("10x", "20x")
#: Physical size of the default sample slide (8192 x 6144 px at 0.25 µm/px), so cohort slides
#: and the demo slide hold tissue of the same scale.
DEFAULT_FIELD_UM = (2048.0, 1536.0)


def patch_regions(sample: SampleSlide, coords: np.ndarray, patch_size_level0: float) -> np.ndarray:
    """Planted class (0 bg, 1 tumor, 2 stroma, 3 immune) at the centre of each patch.

    ``coords`` are level-0 top-left (x, y) as in feature files."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    half = float(patch_size_level0) / 2
    return sample.labels_at(coords[:, 0] + half, coords[:, 1] + half).astype(np.int8)


def planted_table(sample: SampleSlide, feature_files: dict[str, Path]) -> pd.DataFrame:
    """One row per extracted patch: x, y, magnification, region (class name), label (int)."""
    frames = []
    for mag, path in feature_files.items():
        ff = read_features(path)
        labels = patch_regions(sample, ff.coords, ff.patch_size_level0)
        frames.append(pd.DataFrame({
            "x": ff.coords[:, 0], "y": ff.coords[:, 1], "magnification": mag,
            "region": [REGION_CLASSES[v] for v in labels], "label": labels,
        }))
    return pd.concat(frames, ignore_index=True)


def _states(n: int, rng: np.random.Generator) -> np.ndarray:
    """Balanced (tumor, tme) pairs, as synth.layout draws them."""
    states = np.array([(i // 2 % 2, i % 2) for i in range(n)])
    return states[rng.permutation(n)]


def _write_slide(path: Path, **kwargs) -> None:
    """Render to a temporary name and rename: an interrupted run never leaves half a slide."""
    if path.exists() and sidecar_path(path).exists():
        return
    tmp = path.with_name(path.stem + ".part.tif")
    try:
        write_sample_slide(tmp, **kwargs)
        os.replace(sidecar_path(tmp), sidecar_path(path))
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, sidecar_path(tmp)):
            leftover.unlink(missing_ok=True)


def render_cohort(
    *,
    out_dir: str | os.PathLike[str],
    n_patients: int = 40,
    task: str = "classification",
    seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    mpp: float = 0.5,
    encoder: str = "efficientnet-lite0",
    threads: int | None = None,
    strength: tuple[float, float] = (0.6, 1.0),
    gene_signal: float = 1.5,
    batch_size: int = 32,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Render, extract and write a planted cohort; returns the cohort CSV path.

    Slides default to the default sample slide's field (2048 x 1536 µm) at ``mpp``. Each
    patient's contrast ``strength`` is drawn uniformly from the range, per state, so the
    cohort spans looks from near the default sample slide's to the extremes."""
    if task not in ("classification", "survival"):
        raise DataError(f"task must be 'classification' or 'survival', got {task!r}")
    if n_patients < 8:
        raise DataError(f"need at least 8 patients (2 per class in 4 classes), got {n_patients}")
    if mpp not in (0.25, 0.5):
        raise DataError(f"mpp must be 0.25 or 0.5 (level 0 at 40x or 20x), got {mpp}")
    lo, hi = strength
    if not 0 < lo <= hi <= 1:
        raise DataError(f"strength range must satisfy 0 < lo <= hi <= 1, got {strength}")
    say = log or (lambda _msg: None)
    width = width or int(round(DEFAULT_FIELD_UM[0] / mpp))
    height = height or int(round(DEFAULT_FIELD_UM[1] / mpp))
    out = Path(out_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "planted").mkdir(exist_ok=True)

    cfg = SynthConfig(task=task, n_patients=n_patients, seed=seed, gene_signal=gene_signal, mpp_level0=mpp)
    rng = np.random.default_rng(seed)
    states = _states(n_patients, rng)
    strengths = rng.uniform(lo, hi, size=(n_patients, 2))
    slide_seeds = rng.integers(0, 2**31 - 1, size=n_patients)
    patients = [f"TCGA-RS-{i + 1:04d}" for i in range(n_patients)]
    slides = [out / "slides" / f"{p}-S0.tif" for p in patients]

    t0 = time.perf_counter()
    for i, path in enumerate(slides):
        t, e = int(states[i, 0]), int(states[i, 1])
        # each state at its own contrast: tumor knobs from one call, TME knobs from the other
        look_t = state_appearance(tumor_state=t, tme_state=e, strength=float(strengths[i, 0]))
        look_e = state_appearance(tumor_state=t, tme_state=e, strength=float(strengths[i, 1]))
        look = _merge_looks(look_t, look_e)
        _write_slide(path, width=width, height=height, mpp=mpp, seed=int(slide_seeds[i]), **look)
    say(f"rendered {n_patients} slides ({width} x {height} px at {mpp} µm/px) in {time.perf_counter() - t0:.0f} s")

    from napari_dismm.features.cohort import extract_cohort

    t0 = time.perf_counter()
    summary = extract_cohort(
        inputs=slides, out_dir=out / "features", encoder=encoder, magnifications=MAGNIFICATIONS,
        threads=threads, batch_size=batch_size, progress=progress,
    )
    if not summary.ok:
        raise DataError(f"feature extraction failed for {len(summary.failed)} slide(s): {summary.failed[0].error}")
    n_patches = sum(r.n_patches for r in summary.results if not r.skipped)
    seconds = time.perf_counter() - t0
    say(f"extracted {n_patches} new patches in {seconds:.0f} s ({n_patches / max(seconds, 1e-9):.1f} patches/s)")

    by_slide = {r.slide.stem: r for r in summary.results}
    rows, truth = [], []
    for i, (patient, path) in enumerate(zip(patients, slides, strict=True)):
        result = by_slide[path.stem]
        files = {mag: o.path for mag, o in zip(MAGNIFICATIONS, result.outputs, strict=True)}
        row = {"patient_id": patient, "slide_id": path.stem}
        row.update({f"features_{m}": os.path.relpath(files[m], out) for m in MAGNIFICATIONS})
        t, e = int(states[i, 0]), int(states[i, 1])
        if task == "classification":
            row["label"] = CLASS_NAMES[class_of(t, e)]
        rows.append(row)
        truth.append({"patient_id": patient, "slide_id": path.stem, "tumor_state": t, "tme_state": e,
                      "tumor_strength": round(float(strengths[i, 0]), 4),
                      "tme_strength": round(float(strengths[i, 1]), 4)})
        planted = out / "planted" / f"{path.stem}.csv"
        if not planted.exists():
            planted_table(load_sample_slide(path), files).to_csv(planted, index=False)
    table = pd.DataFrame(rows)
    if task == "survival":
        times, events = _survival(np.random.default_rng(seed + 1), cfg, states[:, 0], states[:, 1])
        table["time"], table["event"] = times, events
    csv = out / "cohort.csv"
    table.to_csv(csv, index=False)
    pd.DataFrame(truth).to_csv(out / "truth.csv", index=False)

    sets = load_gene_sets()
    expression = _expression(np.random.default_rng(seed + 2), cfg, states, len(sets.tumor), len(sets.tme))
    expr = pd.DataFrame(expression, columns=list(sets.tumor) + list(sets.tme))
    expr.insert(0, "sample", patients)
    expr.to_csv(out / "expression.tsv", sep="\t", index=False)
    shutil.copyfile(_default_gmt(), out / "sets.gmt")
    return csv


def _merge_looks(tumor_look: dict, tme_look: dict) -> dict:
    """Tumor knobs from one `state_appearance` call, TME knobs from the other."""
    from dataclasses import replace

    look = dict(tumor_look)
    look["appearance"] = replace(
        tumor_look["appearance"], lymph_infiltration=tme_look["appearance"].lymph_infiltration
    )
    look["immune_clusters"] = tme_look["immune_clusters"]
    look["immune_size"] = tme_look["immune_size"]
    return look


def _default_gmt() -> Path:
    """The shipped default gene sets' file (the cohort gets a copy, so it is self-contained)."""
    from importlib.resources import files

    return Path(str(files("napari_dismm") / "data" / "genesets" / "dismm_default.gmt"))
