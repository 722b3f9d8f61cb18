"""A small planted cohort written to disk as a user would give it: cohort CSV, feature h5
files per magnification, an expression TSV and a GMT (helper for the training tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from napari_dismm.features.h5 import FeatureFile, write_features
from napari_dismm.omics import load_gene_sets
from training.synth_layout import MAGNIFICATION_MPP, SynthCohort, SynthConfig, generate_cohort

MAG_NUMBER = {"10x": 10.0, "20x": 20.0}


@dataclass
class CohortFiles:
    root: Path
    csv: Path
    expression: Path
    gmt: Path
    synth: SynthCohort


def pick_genes(n_tumor: int = 6, n_tme: int = 6) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Real symbols from the shipped gene sets, so symbol matching is exercised."""
    sets = load_gene_sets()
    return sets.tumor[:n_tumor], sets.tme[:n_tme]


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
    """Write the cohort under ``root``. ``slides_per_patient`` > 1 repeats a patient's bags
    under new slide ids; ``barcodes`` writes TCGA sample barcodes in the expression table."""
    root.mkdir(parents=True, exist_ok=True)
    tumor, tme = pick_genes()
    cfg = SynthConfig(task=task, n_patients=n_patients, feature_dim=feature_dim, grid_min=3, grid_max=4, seed=seed)
    synth = generate_cohort(cfg, tumor_genes=tumor, tme_genes=tme)
    rows = []
    for patient in synth.patients:
        for k in range(slides_per_patient):
            slide_id = f"{patient.patient_id}-S{k}"
            row = {"patient_id": patient.patient_id, "slide_id": slide_id}
            for mag in MAGNIFICATION_MPP:
                rel = Path("features") / mag / f"{slide_id}.h5"
                write_features(
                    root / rel,
                    FeatureFile(
                        features=patient.features[mag],
                        coords=patient.coords[mag],
                        patch_size=cfg.patch_size,
                        patch_size_level0=cfg.step_level0(MAGNIFICATION_MPP[mag]),
                        target_magnification=MAG_NUMBER[mag],
                        name=slide_id,
                    ),
                )
                row[f"features_{mag}"] = str(rel)
            if task == "classification":
                row["label"] = synth.class_names[patient.label]
            else:
                row["time"], row["event"] = patient.time, patient.event
            rows.append(row)
    csv = root / "cohort.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)

    ids = [p.patient_id + ("-01A" if barcodes else "") for p in synth.patients]
    expr = pd.DataFrame(synth.expression, columns=list(synth.genes))
    expr.insert(0, "sample", ids)
    expression = root / "expression.tsv"
    expr.to_csv(expression, sep="\t", index=False)

    gmt = root / "sets.gmt"
    gmt.write_text(
        "TUMOR_TEST\ttest tumor set\t" + "\t".join(tumor) + "\n" + "TME_TEST\ttest TME set\t" + "\t".join(tme) + "\n"
    )
    return CohortFiles(root, csv, expression, gmt, synth)


def variant(files: CohortFiles, name: str, edit) -> Path:
    """A copy of the cohort CSV beside it (so feature paths still resolve), rewritten
    through ``edit(frame) -> frame`` with all cells as text."""
    frame = pd.read_csv(files.csv, dtype=str)
    out = files.root / f"{name}.csv"
    edit(frame).to_csv(out, index=False)
    return out
