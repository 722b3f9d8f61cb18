"""The shipped demo model: `python -m training.recipes.demo_model [--out WORKDIR] [--install]`.

Why a recipe: the demo student inside the package must be reproducible by one command
from generated data only. Steps (each cached in WORKDIR, so a re-run resumes):

1. render the planted synthetic cohort (:func:`training.synth.rendered.render_cohort`): slides
   whose tumor / TME look follows hidden states, real encoder features, expression;
2. train teacher and student with the protocol runner (:func:`training.run.run_training`,
   3 patient-level folds, model selection on a validation split inside each training fold);
3. name the subspaces: with K = 2 the student's two clusters separate planted tumor from
   the rest, but which of them the teacher prototypes call "tumor" came out arbitrary
   per fold and magnification on this cohort. Stage II now names them by agreement with
   the teacher's maps (training/stages/distillation.py); on top, per magnification, the map that ranks
   planted tumor higher on the fold's *training* patients is named tumor
   (:func:`swap_subspaces`: a renaming, every logit unchanged);
4. score every fold's (renamed) student: held-out classification metrics (from the
   runner) and how well its tumor attention ranks planted tumor patches (AUROC) on the
   fold's training patients, its held-out patients and the default sample slide;
5. choose the fold whose tumor attention is best on its own *training* patients (never
   on held-out patients, never on the demo slide), and with ``--install`` copy that
   student to ``napari_dismm/data/demo_model``.

The demo slide's AUROC is printed as a check, not used to choose or to name.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.synth.rendered import patch_regions, render_cohort

TRAINED_FOR = "demo: 4-class planted synthetic cohort (tumor state x TME state), rendered H&E-like slides"
INSTALL_DIR = Path(__file__).resolve().parents[2] / "src" / "napari_dismm" / "data" / "demo_model"
TUMOR = 1

#: Small and fast: d = 64 keeps the student file well under 2 MB with 1280-d features.
#: Everything else is the package's default (``training/config.py``), so the shipped student
#: is what `dismm train` makes: soft ITA memberships with attention distillation, a gated
#: teacher with spatial context, DEV and CGC off (the earlier shipped student, format 1,
#: pinned the reference's hard ITA, the paper's DEV and no context; recipe before 2026-12-07).
DEMO_CONFIG: dict[str, dict[str, Any]] = {
    "data": {"batch_size": 8, "max_patches": 1024, "cache_gb": 1.0},
    "model": {"d": 64, "n_heads": 4},
    "teacher": {},
    "student": {},
    "cv": {"folds": 3, "val_fraction": 0.2, "seed": 0},
    "baselines": {"run": []},
}


def demo_config(overrides: dict[str, dict[str, Any]] | None = None):
    """The recipe's TrainConfig; ``overrides`` replace keys section by section."""
    from training.config import config_from_dict

    merged = {name: {**values, **(overrides or {}).get(name, {})} for name, values in DEMO_CONFIG.items()}
    return config_from_dict(merged, source="demo recipe")


# -- attention against planted regions --------------------------------------------------------------


def _auroc(positive: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    positive = np.asarray(positive, bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, score))


def attention_auroc(model_dir: str | Path, *, features: dict[str, Path], tumor: dict[str, np.ndarray],
                    column: str = "tumor_attention") -> dict[str, float]:
    """AUROC with which an attention map (``column`` of the prediction's patch table) ranks
    planted tumor patches ``{mag: (N,) bool}`` (feature-file row order) above the others:
    per magnification and over both (``all``, each map scaled to its maximum)."""
    return _attention_aurocs(model_dir, features=features, tumor=tumor, columns=(column,))[column]


def _attention_aurocs(model_dir, *, features, tumor, columns) -> dict[str, dict[str, float]]:
    from napari_dismm.features.h5 import read_features
    from napari_dismm.predict import predict_features

    rows = predict_features(features=features, model_dir=model_dir, device="cpu").patches
    result = {}
    for column in columns:
        scores, truth, out = [], [], {}
        for mag, path in features.items():
            ff = read_features(path)
            part = rows[rows["magnification"] == mag]
            lookup = {(int(x), int(y)): a for x, y, a in zip(part["x"], part["y"], part[column], strict=True)}
            att = np.array([lookup[(int(x), int(y))] for x, y in ff.coords], dtype=np.float64)
            att = att / max(att.max(), 1e-12)  # per-map scale, so magnifications pool fairly
            out[mag] = _auroc(tumor[mag], att)
            scores.append(att)
            truth.append(tumor[mag])
        out["all"] = _auroc(np.concatenate(truth), np.concatenate(scores))
        result[column] = out
    return result


def cohort_attention(model_dir: Path, cohort_dir: Path, slide_ids: list[str],
                     columns: tuple[str, ...] = ("tumor_attention",)) -> dict[str, dict[str, float]]:
    """Per map: mean over slides of the per-slide AUROC (per magnification, ``all``)."""
    table = pd.read_csv(cohort_dir / "cohort.csv")
    per: dict[str, dict[str, list[float]]] = {c: {} for c in columns}
    for _, row in table[table["slide_id"].isin(slide_ids)].iterrows():
        planted = pd.read_csv(cohort_dir / "planted" / f"{row['slide_id']}.csv")
        features = {m: cohort_dir / row[f"features_{m}"] for m in ("10x", "20x")}
        tumor = {m: (planted[planted["magnification"] == m]["label"] == TUMOR).to_numpy() for m in features}
        for column, scores in _attention_aurocs(model_dir, features=features, tumor=tumor, columns=columns).items():
            for k, v in scores.items():
                per[column].setdefault(k, []).append(v)
    return {c: {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in d.items()}
            for c, d in per.items()}


def sample_slide_features(
    out_dir: Path, *, threads: int | None = None
) -> tuple[dict[str, Path], dict[str, np.ndarray]]:
    """Features of the default sample slide (cached in ``out_dir``) and its planted tumor
    labels per patch (patch centre in a tumor region)."""
    from napari_dismm.features.extract import extract_slide
    from napari_dismm.features.h5 import read_features
    from napari_dismm.slide.synthetic import load_sample_slide, sample_slide_path

    path = sample_slide_path()
    result = extract_slide(slide_path=path, out_dir=out_dir, encoder="efficientnet-lite0",
                           magnifications=("10x", "20x"), threads=threads, batch_size=32)
    features = {m: o.path for m, o in zip(("10x", "20x"), result.outputs, strict=True)}
    sample = load_sample_slide(path)
    tumor = {}
    for mag, p in features.items():
        ff = read_features(p)
        tumor[mag] = patch_regions(sample, ff.coords, ff.patch_size_level0) == TUMOR
    return features, tumor


# -- the recipe ---------------------------------------------------------------------------------------


def run_recipe(*, work: Path, n_patients: int = 40, threads: int | None = None, install: bool = False,
               config: dict[str, dict[str, Any]] | None = None, render: dict[str, Any] | None = None,
               log=print) -> dict[str, Any]:
    """Render, train, score and (optionally) install; returns the report written to
    ``work/demo_report.json``."""
    from training.run import run_training

    cohort_dir, run_dir = work / "cohort", work / "run"
    csv = render_cohort(out_dir=cohort_dir, n_patients=n_patients, threads=threads, progress=False, log=log,
                        **(render or {}))
    if threads:
        import torch

        torch.set_num_threads(threads)
    summary = run_training(cohort_csv=csv, expression=cohort_dir / "expression.tsv", gene_sets=cohort_dir / "sets.gmt",
                           task="classification", out=run_dir, config=demo_config(config),
                           models=("teacher", "student"),
                           log=log)
    split = json.loads((run_dir / "split.json").read_text())
    table = pd.read_csv(csv)
    sample_features, sample_tumor = sample_slide_features(work / "sample_features", threads=threads)
    folds = []
    for k, fold in enumerate(split["folds"]):
        best = run_dir / "student" / f"fold_{k}" / "best"
        train_ids = table[table["patient_id"].isin([*fold["train"], *fold["val"]])]["slide_id"].tolist()
        test_ids = table[table["patient_id"].isin(fold["test"])]["slide_id"].tolist()
        metrics = json.loads((run_dir / "student" / f"fold_{k}" / "metrics.json").read_text())["test"]
        teacher = json.loads((run_dir / "teacher" / f"fold_{k}" / "metrics.json").read_text())["test"]
        # name the subspaces: per magnification, the map that finds planted tumor on the
        # fold's TRAINING patients is called tumor (see swap_subspaces; logits unchanged)
        raw = cohort_attention(best, cohort_dir, train_ids, columns=("tumor_attention", "tme_attention"))
        renamed = [m for m in ("10x", "20x") if raw["tme_attention"][m] > raw["tumor_attention"][m]]
        named = work / "named" / f"fold_{k}"
        swap_subspaces(best, named, magnifications=renamed)
        entry = {
            "fold": k, "student_test": metrics, "teacher_test": teacher,
            "attention_train_as_trained": raw, "renamed_magnifications": renamed,
            "attention_train": cohort_attention(named, cohort_dir, train_ids)["tumor_attention"],
            "attention_test": cohort_attention(named, cohort_dir, test_ids)["tumor_attention"],
            "attention_sample_slide": attention_auroc(named, features=sample_features, tumor=sample_tumor),
        }
        folds.append(entry)
        log(f"fold {k}: student test {_fmt(metrics)} | teacher test {_fmt(teacher)}")
        log(f"  as trained, on training patients: tumor map {_fmt(raw['tumor_attention'])}, "
            f"TME map {_fmt(raw['tme_attention'])} -> renamed {renamed or 'none'}")
        log(f"  tumor-attention AUROC train {_fmt(entry['attention_train'])} | held-out {_fmt(entry['attention_test'])}"
            f" | sample slide {_fmt(entry['attention_sample_slide'])}")
    chosen = max(folds, key=lambda f: (np.nan_to_num(f["attention_train"]["all"], nan=-1.0), -f["fold"]))
    report = {"summary": summary, "folds": folds, "chosen_fold": chosen["fold"],
              "selection": "best tumor-attention AUROC on the fold's own training patients"}
    (work / "demo_report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    log(f"chosen: fold {chosen['fold']} (sample-slide tumor-attention AUROC {_fmt(chosen['attention_sample_slide'])})")
    if install:
        install_model(work / "named" / f"fold_{chosen['fold']}", INSTALL_DIR, fold=chosen["fold"])
        log(f"installed to {INSTALL_DIR}")
    return report


def install_model(source: Path, target: Path, *, fold: int) -> None:
    """Copy the student's weights and config; the config names what it was trained for and
    forgets the run's local paths."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "model.safetensors", target / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    config["trained_for"] = TRAINED_FOR
    config["teacher"] = f"fold {fold} teacher of `python -m training.recipes.demo_model` (not shipped)"
    config["model_name"] = "dismm-demo-student"
    (target / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def swap_subspaces(model_dir: Path, out_dir: Path, *, magnifications: list[str]) -> None:
    """Rename tumor <-> TME for some magnifications of a student, predictions unchanged.

    Why this is a renaming and not a change: with K = 2 the cluster -> subspace rule is
    symmetric in the two prototypes, so swapping them swaps which cluster is called tumor,
    and swapping the fusion head's tumor and TME weight blocks gives every logit exactly
    as before. Only the names of the two attention maps change."""
    from napari_dismm.model.checkpoint import load_model, save_model

    model, config = load_model(model_dir)
    for mag in magnifications:
        model.swap_subspaces(mag)
    extra = {k: v for k, v in config.items() if k not in ("model", "model_id", "format_version")}
    extra["subspaces_renamed"] = list(magnifications)
    save_model(model, out_dir, extra=extra)


def _fmt(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in values.items() if isinstance(v, (int, float)) and v is not None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.recipes.demo_model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_work"), help="work directory (cached, resumable)")
    parser.add_argument("--install", action="store_true", help="copy the chosen student into the package")
    parser.add_argument("--patients", type=int, default=40, help="patients in the rendered cohort")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    run_recipe(work=args.out, n_patients=args.patients, threads=args.threads, install=args.install)
    return 0


if __name__ == "__main__":
    sys.exit(main())
