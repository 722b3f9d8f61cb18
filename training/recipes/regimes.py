"""Every model over a family of planted regimes: where does the teacher stand?

Why: a default (gene residual, DEV, CGC, spatial context, ...) must help across cohorts,
not on the one it was tuned on. Each regime of ``training.synth.REGIMES`` puts the label's
signal somewhere else (genes only, slides only, both, weak, a small region, a TME that
varies apart from the label); this recipe trains the named models on the same folds of each
and prints, per regime, held-out AUC (or C-index) and the teacher's map AUROC on the planted
tumor / TME patches. Run it with other seeds than the ones a choice was made on to report.

    python -m training.recipes.regimes --out DIR --regimes genes slide --seeds 3 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from napari_dismm.model.checkpoint import load_model
from napari_dismm.omics import ExpressionNormaliser
from training.cohort import load_cohort
from training.config import config_from_dict
from training.dataset import SlideDataset, saved_bin_edges
from training.engine import main_metric, predict
from training.run import fold_attention_auroc, run_training
from training.splits import Split
from training.synth import REGIMES, regime_config, write_synthetic_cohort

MAP_MODELS = ("teacher", "student", "teacher_no_dev", "teacher_no_cgc", "teacher_no_context", "teacher_cgc",
              "teacher_dev")


def held_out_map_auroc(files, run: Path, model_name: str, task: str, folds=None) -> dict[str, float]:
    """Held-out AUROC of the model's tumor map on tumor patches and TME map on TME patches
    (over the test patients of ``folds``, default every fold)."""
    cohort = load_cohort(cohort_csv=files.csv, expression=files.expression, gene_sets=files.gmt, task=task)
    split = Split.load(run / "split.json")
    regions = pd.read_csv(files.regions)
    maps, truth = [], []
    for k, fold in enumerate(split.folds):
        if folds is not None and k not in folds:
            continue
        model, doc = load_model(run / model_name / f"fold_{k}" / "best")
        norm = ExpressionNormaliser.from_dict(doc["normaliser"]) if doc.get("normaliser") else None
        pred = predict(model, SlideDataset(cohort=cohort, patients=fold.test, normaliser=norm,
                                           bin_edges=saved_bin_edges(doc)), attention=True)
        maps += pred.attention
        truth += [{m: g["region"].to_numpy() for m, g in regions[regions.slide_id == s].groupby("magnification")}
                  for s in pred.slide_ids]
    return {u: fold_attention_auroc(maps, truth, attention=u, region=u) for u in ("tumor", "tme")}


def run_regime(out: Path, *, regime: str, seed: int, models: list[str], config: dict, task: str = "classification",
               n_patients: int = 64, maps: bool = True, **overrides: object) -> dict[str, dict[str, float]]:
    """Train ``models`` on one regime and seed; per model: held-out metric (and map AUROCs).
    ``overrides`` change the regime's cohort settings (``training.synth.regime_config``)."""
    cohort = regime_config(regime, task=task, n_patients=n_patients, seed=seed, **overrides)
    files = write_synthetic_cohort(out / "cohort", config=cohort, n_tumor_genes=16, n_tme_genes=16)
    summary = run_training(cohort_csv=files.csv, expression=files.expression, gene_sets=files.gmt, task=task,
                           out=out / "run", config=config_from_dict(config), models=models, log=None)
    metric = main_metric(task)
    rows = {}
    for name, per in summary.items():
        row = {metric: per[metric]["mean"], f"{metric}_sd": per[metric]["sd"]}
        if "accuracy" in per:
            row["accuracy"] = per["accuracy"]["mean"]
        if maps and name in MAP_MODELS:
            auroc = held_out_map_auroc(files, out / "run", name, task)
            row.update({f"map_{u}": v for u, v in auroc.items()})
        rows[name] = row
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--models", nargs="+",
                        default=["teacher", "abmil", "late_fusion", "genes_only", "meanpool_probe"])
    parser.add_argument("--config", type=str, default="{}", help="training config as JSON (sections as in TOML)")
    parser.add_argument("--task", default="classification")
    parser.add_argument("--patients", type=int, default=64)
    args = parser.parse_args(argv)
    config = json.loads(args.config)
    frames = []
    for regime in args.regimes:
        for seed in args.seeds:
            rows = run_regime(args.out / f"{regime}_s{seed}", regime=regime, seed=seed, models=args.models,
                              config=config, task=args.task, n_patients=args.patients)
            frame = pd.DataFrame(rows).T.assign(regime=regime, seed=seed)
            print(frame.round(3).to_string(), flush=True)
            frames.append(frame)
    table = pd.concat(frames).rename_axis("model").reset_index()
    table.to_csv(args.out / "regimes.csv", index=False)
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
