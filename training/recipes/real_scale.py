"""Teacher and student at real-slide scale (issue 14): held-out AUC and map AUROC.

Why: every default was first chosen on planted cohorts of a few hundred patches per slide.
This recipe writes a planted cohort of real-size bags (``--patches-20x``, thousands of
patches at 20x) whose slides mix two scanners (0.25 and 0.5 µm/px), trains the teacher and
the student with the given config, and reports per model the held-out AUC, the teacher's
map AUROC on the planted tumor / TME patches (its maps need the genes, so they are read
through the training predictor) and the student's, read from the bundles ``dismm predict``
writes for every held-out slide, as a pathologist would open them.

    python -m training.recipes.real_scale --out DIR [--patients 24] [--patches-20x 5600] \
        [--config '{"model": {"d": 32}}']
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from training.config import config_from_dict
from training.recipes.regimes import MAP_MODELS, held_out_map_auroc
from training.run import run_training
from training.synth import CohortFiles, planted_cohort_config, write_synthetic_cohort


def write_cohort(out: Path, *, n_patients: int, patches_20x: int, seed: int, spread: float = 0.1,
                 scanner_mix: float = 0.5, feature_dim: int = 32, regime: dict | None = None) -> CohortFiles:
    """A planted cohort of real-size bags, half its slides at each scanner."""
    config = planted_cohort_config(n_patients=n_patients, seed=seed, patches_20x=patches_20x,
                                   scanner_mix=scanner_mix, feature_dim=feature_dim, **(regime or {}))
    return write_synthetic_cohort(out, config=replace(config, size_spread=spread), n_tumor_genes=16,
                                  n_tme_genes=16)


def bundle_map_auroc(files: CohortFiles, run: Path, model: str, folds=None) -> dict[str, list[float]]:
    """Per held-out slide (of ``folds``, default every fold) and magnification, the AUROC of
    the tumor (TME) attention of the bundle `dismm predict` writes for the planted tumor (TME)
    patches."""
    from sklearn.metrics import roc_auc_score

    from napari_dismm.cli import main as dismm

    cohort = pd.read_csv(files.csv)
    regions = pd.read_csv(files.regions)
    split = json.loads((run / "split.json").read_text())
    aurocs: dict[str, list[float]] = {"tumor": [], "tme": []}
    for k, fold in enumerate(split["folds"]):
        if folds is not None and k not in folds:
            continue
        for row in cohort[cohort.patient_id.isin(fold["test"])].itertuples():
            bundle = run / "bundles" / model / row.slide_id
            code = dismm(["predict", str(files.csv.parent / row.features_10x), str(files.csv.parent / row.features_20x),
                          "--model", str(run / model / f"fold_{k}" / "best"), "--out", str(bundle)])
            if code:
                raise RuntimeError(f"dismm predict failed on {row.slide_id} (exit {code})")
            patches = pd.read_csv(bundle / "patches.csv")
            merged = patches.merge(regions[regions.slide_id == row.slide_id], on=["magnification", "x", "y"],
                                   how="left", validate="one_to_one")
            if merged["region"].isna().any():
                raise RuntimeError(f"{row.slide_id}: bundle rows that are no patch of the slide")
            for u in aurocs:
                for _, per_mag in merged.groupby("magnification"):
                    planted = (per_mag["region"] == u).to_numpy()
                    if 0 < planted.sum() < len(planted):
                        aurocs[u].append(float(roc_auc_score(planted, per_mag[f"{u}_attention"])))
    return aurocs


def run(out: Path, *, n_patients: int, patches_20x: int, seed: int, config: dict,
        models: tuple[str, ...] = ("teacher", "student"), folds=None) -> dict[str, dict[str, float]]:
    """Write the cohort, train ``models`` on ``folds`` (default every fold), score them."""
    files = write_cohort(out / "cohort", n_patients=n_patients, patches_20x=patches_20x, seed=seed)
    summary = run_training(cohort_csv=files.csv, expression=files.expression, gene_sets=files.gmt,
                           task="classification", out=out / "run", config=config_from_dict(config),
                           models=list(models), folds=folds, log=None)
    rows = {}
    for name in models:
        row = {"auc": summary[name]["auc"]["mean"], "auc_sd": summary[name]["auc"]["sd"],
               "accuracy": summary[name]["accuracy"]["mean"]}
        if name == "student":
            maps = {u: float(np.mean(v)) for u, v in bundle_map_auroc(files, out / "run", name, folds).items()}
        elif name in MAP_MODELS:
            maps = held_out_map_auroc(files, out / "run", name, "classification", folds)
        else:  # a baseline has no tumor / TME maps
            maps = {}
        row.update({f"map_{u}": v for u, v in maps.items()})
        rows[name] = row
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--patients", type=int, default=24)
    parser.add_argument("--patches-20x", type=int, default=5600)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--models", nargs="+", default=["teacher", "student"])
    parser.add_argument("--config", type=str, default="{}", help="training config as JSON (sections as in TOML)")
    parser.add_argument("--folds", type=int, nargs="+", default=None, help="train and score only these folds")
    args = parser.parse_args(argv)
    rows = run(args.out, n_patients=args.patients, patches_20x=args.patches_20x, seed=args.seed,
               config=json.loads(args.config), models=tuple(args.models), folds=args.folds)
    table = pd.DataFrame(rows).T
    table.to_csv(args.out / "real_scale.csv")
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
