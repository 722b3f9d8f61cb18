"""A small planted cohort written to disk as a user would give it (helper for the training
tests). The writing lives in :mod:`training.synth`; this keeps the tests' short signature."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from training.synth import MAG_NUMBER, CohortFiles, pick_genes, write_synthetic_cohort
from training.synth.layout import SynthConfig

__all__ = ["MAG_NUMBER", "CohortFiles", "pick_genes", "variant", "write_cohort"]


def write_cohort(
    root: Path,
    *,
    task: str = "classification",
    n_patients: int = 12,
    feature_dim: int = 8,
    seed: int = 0,
    slides_per_patient: int = 1,
    barcodes: bool = False,
) -> CohortFiles:
    """Write a tiny cohort under ``root``. ``slides_per_patient`` > 1 repeats a patient's bags
    under new slide ids; ``barcodes`` writes TCGA sample barcodes in the expression table."""
    cfg = SynthConfig(task=task, n_patients=n_patients, feature_dim=feature_dim, grid_min=3, grid_max=4, seed=seed)
    return write_synthetic_cohort(
        root, config=cfg, slides_per_patient=slides_per_patient, barcodes=barcodes, with_truth=False
    )


def variant(files: CohortFiles, name: str, edit) -> Path:
    """A copy of the cohort CSV beside it (so feature paths still resolve), rewritten
    through ``edit(frame) -> frame`` with all cells as text."""
    frame = pd.read_csv(files.csv, dtype=str)
    out = files.root / f"{name}.csv"
    edit(frame).to_csv(out, index=False)
    return out
