"""Write a planted synthetic cohort to disk, exactly as a user would hand one to `dismm train`.

Why on disk: the training loop must be exercised through the same files a real cohort
comes in (cohort CSV, CLAM/TRIDENT-style feature h5 per magnification, an expression
table, a GMT), so the synthetic run tests the reading code too. The planted layout itself
(regions, hidden states, expression) is :mod:`training.synth.layout`; this module only
writes it, plus the ground truth a test needs: ``truth.csv`` (hidden states and the
slide's scanner mpp per patient) and ``regions.csv`` (the planted region of every patch,
per magnification). It streams: each slide is written as soon as it is drawn, so a
real-scale cohort (``SynthConfig.patches_20x``) is never in memory whole.

Gene names are real symbols from the shipped default gene sets, so symbol matching runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from napari_dismm.errors import DataError
from napari_dismm.features.h5 import FeatureFile, write_features
from napari_dismm.omics import load_gene_sets
from training.synth.layout import (
    MAGNIFICATION_MPP,
    REGION_NAMES,
    SynthCohort,
    SynthConfig,
    SynthPatient,
    class_names,
    generate_cohort,
)

MAG_NUMBER = {"10x": 10.0, "20x": 20.0}


@dataclass
class CohortFiles:
    """Paths of a written cohort and the in-memory cohort they came from."""

    root: Path
    csv: Path
    expression: Path
    gmt: Path
    synth: SynthCohort
    truth: Path | None = None
    regions: Path | None = None


def pick_genes(n_tumor: int = 6, n_tme: int = 6) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The first genes of each shipped default set (real symbols)."""
    sets = load_gene_sets()
    if n_tumor < 1 or n_tme < 1 or n_tumor > len(sets.tumor) or n_tme > len(sets.tme):
        raise DataError(
            f"gene counts must be 1..{len(sets.tumor)} (tumor) and 1..{len(sets.tme)} (TME), got {n_tumor}, {n_tme}"
        )
    return sets.tumor[:n_tumor], sets.tme[:n_tme]


def write_synthetic_cohort(
    root: str | os.PathLike[str],
    *,
    config: SynthConfig,
    n_tumor_genes: int = 6,
    n_tme_genes: int = 6,
    slides_per_patient: int = 1,
    barcodes: bool = False,
    with_truth: bool = True,
    keep_features: bool = True,
) -> CohortFiles:
    """Generate ``config``'s cohort and write it under ``root``, slide by slide.

    ``slides_per_patient`` > 1 repeats a patient's bags under new slide ids; ``barcodes``
    writes TCGA sample barcodes (``-01A``) in the expression table; ``with_truth`` adds
    ``truth.csv`` and ``regions.csv``; ``keep_features=False`` drops each slide's features
    from the returned cohort once written (what a real-scale cohort needs).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tumor, tme = pick_genes(n_tumor_genes, n_tme_genes)
    regions_csv = root / "regions.csv"
    if with_truth:
        regions_csv.unlink(missing_ok=True)
    rows: list[dict[str, object]] = []
    names = class_names(config)

    def write_patient(patient: SynthPatient) -> None:
        for k in range(slides_per_patient):
            slide_id = f"{patient.patient_id}-S{k}"
            row: dict[str, object] = {"patient_id": patient.patient_id, "slide_id": slide_id}
            for mag in MAGNIFICATION_MPP:
                rel = Path("features") / mag / f"{slide_id}.h5"
                write_features(root / rel, _feature_file(config, patient, mag, slide_id))
                row[f"features_{mag}"] = str(rel)
                if with_truth:
                    xy = patient.coords[mag]
                    pd.DataFrame({
                        "slide_id": slide_id, "magnification": mag, "x": xy[:, 0], "y": xy[:, 1],
                        "region": np.asarray(REGION_NAMES)[patient.regions[mag]],
                    }).to_csv(regions_csv, mode="a", header=not regions_csv.exists(), index=False)
            if config.task == "classification":
                row["label"] = names[patient.label]
            else:
                row["time"], row["event"] = patient.time, patient.event
            rows.append(row)

    synth = generate_cohort(config, tumor_genes=tumor, tme_genes=tme, on_patient=write_patient,
                            keep_features=keep_features)
    csv = root / "cohort.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)

    ids = [p.patient_id + ("-01A" if barcodes else "") for p in synth.patients]
    expr = pd.DataFrame(synth.expression, columns=list(synth.genes))
    expr.insert(0, "sample", ids)
    expression = root / "expression.tsv"
    expr.to_csv(expression, sep="\t", index=False)

    gmt = root / "sets.gmt"
    gmt.write_text(
        "TUMOR_SYNTH\tplanted tumor genes\t" + "\t".join(tumor) + "\n"
        + "TME_SYNTH\tplanted TME genes\t" + "\t".join(tme) + "\n"
    )
    files = CohortFiles(root, csv, expression, gmt, synth)
    if with_truth:
        files.truth = root / "truth.csv"
        pd.DataFrame([
            {"patient_id": p.patient_id, "tumor_state": p.tumor_state, "tme_state": p.tme_state,
             "mpp": p.mpp_level0}
            for p in synth.patients
        ]).to_csv(files.truth, index=False)
        files.regions = regions_csv
    return files


def _feature_file(config: SynthConfig, patient: SynthPatient, mag: str, slide_id: str) -> FeatureFile:
    """One bag as TRIDENT would write it for a slide scanned at ``patient.mpp_level0``."""
    mpp0 = patient.mpp_level0
    footprint = config.step_level0(MAGNIFICATION_MPP[mag], mpp_level0=mpp0)
    step10 = config.step_level0(MAGNIFICATION_MPP["10x"], mpp_level0=mpp0)
    extent = patient.coords["10x"].max(0) + step10 if len(patient.coords["10x"]) else np.zeros(2, np.int64)
    return FeatureFile(
        features=patient.features[mag], coords=patient.coords[mag], patch_size=config.patch_size,
        patch_size_level0=footprint, target_magnification=MAG_NUMBER[mag], level0_magnification=10.0 / mpp0,
        level0_width=int(extent[0]), level0_height=int(extent[1]), mpp=mpp0, name=slide_id, encoder="synthetic",
    )


def planted_cohort_config(*, task: str = "classification", n_patients: int = 64, seed: int = 0,
                          patch_signal: float = 2.0, gene_signal: float = 1.5, region_fraction: float = 0.15,
                          label_from: str = "both", feature_dim: int = 64, patches_20x: int | None = None,
                          scanner_mix: float = 1.0) -> SynthConfig:
    """The small planted cohort the tests and benchmark train on (a few minutes on 2 CPU cores);
    ``patches_20x`` and ``scanner_mix`` make it real-scale (issue 14, ``SynthConfig``)."""
    return SynthConfig(task=task, n_patients=n_patients, feature_dim=feature_dim, grid_min=4, grid_max=6, seed=seed,
                       patch_signal=patch_signal, type_signal=2.0, region_fraction=region_fraction,
                       gene_signal=gene_signal, label_from=label_from, patches_20x=patches_20x,
                       scanner_mix=scanner_mix)


#: Planted regimes: where the label's signal lives. Defaults are chosen on some of these
#: (and some seeds) and reported on others (README, ``training.recipes.regimes``).
REGIMES: dict[str, dict[str, object]] = {
    "both": {},                                             # slide and genes carry both states
    "genes": {"patch_signal": 0.0},                         # the state is in the genes only
    "slide": {"gene_signal": 0.0},                          # the state is in the slides only
    "weak": {"patch_signal": 0.75, "gene_signal": 0.75},    # weak per-patch and per-gene signal
    "small_region": {"region_fraction": 0.04},              # planted regions of a few patches
    "tme_independent": {"label_from": "tumor"},             # two classes; TME varies apart from the label
}


def regime_config(regime: str, *, task: str = "classification", n_patients: int = 64, seed: int = 0,
                  **overrides: object) -> SynthConfig:
    """The planted cohort of ``regime`` (a key of REGIMES); ``overrides`` win over it."""
    if regime not in REGIMES:
        raise DataError(f"unknown regime {regime!r}; choose from {', '.join(REGIMES)}")
    return planted_cohort_config(task=task, n_patients=n_patients, seed=seed, **{**REGIMES[regime], **overrides})
