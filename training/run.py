"""The protocol: every model over the same patient-level folds, one summary table.

Why one runner: DisMM's teacher and student, its ablations (CGC off, DEV off) and the
baselines (ABMIL, late fusion) are only comparable on the same split, the same validation
parts and the same test patients, touched once. The run directory is the record:

    OUT/config.resolved.toml  OUT/split.json
    OUT/<model>/fold_<k>/{history.csv, history.json, checkpoint/, best/, test_predictions.csv, metrics.json}
    OUT/summary.json  OUT/summary.csv  OUT/figures/*.png

Starting the same command again resumes: finished folds are read back, an interrupted fold
continues from its last epoch checkpoint (engine.train_fold).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_dismm.errors import DataError
from training.cohort import Cohort, load_cohort
from training.config import DEV_WEIGHT_ON, TrainConfig, config_to_toml, load_config
from training.dataset import BagCache
from training.engine import progress_bars
from training.ddp import SINGLE, DistContext, barrier
from training.metrics import summary_json, summary_table
from training.mirror import MIRROR_MODELS, MirrorSettings, run_mirror_model
from training.splits import Split, load_or_make_split
from training.stages.supervised import FoldSetup, prepare_fold, train_supervised_fold
from training.stages.distillation import train_student_fold

CONFIG_FILE = "config.resolved.toml"
SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class ModelSpec:
    """A named model of a run: its kind and, for teacher ablations, the switches it overrides."""

    name: str
    kind: str
    cgc: bool | None = None
    dev_weight: float | None = None
    subspace_split: bool = True
    spatial_context: float | None = None

    @property
    def needs_genes(self) -> bool:
        """Whether the fold's datasets carry the gene-set vectors (MIRROR builds its own)."""
        return self.kind not in ("abmil", *MIRROR_MODELS)


#: the teacher with one component switched away from the run's setting: a component on by
#: default gets its "no_" row, one off by default its "with" row (``plan_models``)
ABLATIONS = (ModelSpec("teacher_no_cgc", "teacher", cgc=False), ModelSpec("teacher_no_dev", "teacher", dev_weight=0.0),
             ModelSpec("teacher_no_context", "teacher", spatial_context=0.0),
             ModelSpec("teacher_cgc", "teacher", cgc=True), ModelSpec("teacher_dev", "teacher", dev_weight=DEV_WEIGHT_ON))
KNOWN = {"teacher": ModelSpec("teacher", "teacher"), "student": ModelSpec("student", "student"),
         "abmil": ModelSpec("abmil", "abmil"), "late_fusion": ModelSpec("late_fusion", "late_fusion"),
         "genes_only": ModelSpec("genes_only", "genes_only"),
         **{a.name: a for a in ABLATIONS},
         # not in the default ablations: one gene encoder for both subspaces (issue 7's CKA contrast)
         "teacher_no_split": ModelSpec("teacher_no_split", "teacher", subspace_split=False),
         # the second model family (issue 8): pretrained without labels per fold, then probed
         **{name: ModelSpec(name, name) for name in MIRROR_MODELS}}


def plan_models(cfg: TrainConfig, *, models: Sequence[str] | None = None, ablations: bool = False) -> list[ModelSpec]:
    """Models in training order (a student needs its teacher, so the teacher comes first)."""
    names = list(models) if models else ["teacher", "student", *cfg.baselines.run]
    if ablations:
        names += [a.name for a in ABLATIONS if _differs(a, cfg)]
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise DataError(f"unknown model {unknown[0]!r}; choose from {', '.join(KNOWN)}")
    if "student" in names and "teacher" not in names:
        names.insert(0, "teacher")
    order = {n: i for i, n in enumerate(KNOWN)}
    return [KNOWN[n] for n in sorted(dict.fromkeys(names), key=order.__getitem__)]


def _differs(spec: ModelSpec, cfg: TrainConfig) -> bool:
    """Whether an ablation's override changes the run's teacher (else it would repeat it)."""
    t = cfg.teacher
    return ((spec.cgc is not None and spec.cgc != t.cgc)
            or (spec.dev_weight is not None and (spec.dev_weight > 0) != (t.dev_weight > 0))
            or (spec.spatial_context is not None and (spec.spatial_context > 0) != (t.spatial_context > 0)))


def _write_config(out: Path, cfg: TrainConfig) -> None:
    path, text = out / CONFIG_FILE, config_to_toml(cfg)
    if path.exists() and path.read_text() != text:
        raise DataError(f"{path} holds another configuration: resume with the same config or use a new --out")
    path.write_text(text)


def _split(out: Path, cohort: Cohort, cfg: TrainConfig, ctx: DistContext) -> Split:
    """Rank 0 makes (or checks) the split; the others read the file it wrote."""
    kwargs = {"cohort": cohort, "n_folds": cfg.cv.folds, "val_fraction": cfg.cv.val_fraction, "seed": cfg.cv.seed}
    split = load_or_make_split(out / SPLIT_FILE, **kwargs) if ctx.is_main else None
    barrier(ctx)
    return split if split is not None else load_or_make_split(out / SPLIT_FILE, **kwargs)


def run_training(
    *,
    cohort_csv: str | os.PathLike[str],
    expression: str | os.PathLike[str],
    gene_sets: str | os.PathLike[str] | None,
    task: str,
    out: str | os.PathLike[str],
    config: TrainConfig | str | os.PathLike[str] | None = None,
    models: Sequence[str] | None = None,
    ablations: bool = False,
    folds: Sequence[int] | None = None,
    ctx: DistContext = SINGLE,
    log: Callable[[str], None] | None = print,
    mirror: MirrorSettings | None = None,
    progress: bool = False,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Train every planned model on every fold; returns the summary (``summary.json``).

    ``progress``: a bar per model and fold on stderr (epochs, losses, ETA; engine.progress_bars).

    ``mirror``: settings of the MIRROR models (``mirror_probe``, ``mirror_fewshot``,
    ``meanpool_probe``; defaults when None). They run on the main process only."""
    cfg = config if isinstance(config, TrainConfig) else load_config(config)
    out = Path(out)
    cohort = load_cohort(cohort_csv=cohort_csv, expression=expression, gene_sets=gene_sets, task=task,
                         magnifications=cfg.data.magnifications, log1p=cfg.data.log1p)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_config(out, cfg)
    barrier(ctx)
    split = _split(out, cohort, cfg, ctx)
    specs = plan_models(cfg, models=models, ablations=ablations)
    cache = BagCache(int(cfg.data.cache_gb * 1024**3))
    say = log if (log is not None and ctx.is_main) else (lambda _msg: None)
    with progress_bars(progress):
        _train_folds(out=out, cohort=cohort, cfg=cfg, split=split, specs=specs, cache=cache, folds=folds, ctx=ctx,
                     say=say, expression=expression, mirror=mirror)
    summary = collect_summary(out)
    if ctx.is_main:
        write_summary(out, summary)
        write_figures(out, cohort)
    barrier(ctx)
    return summary


def _train_folds(*, out, cohort, cfg, split, specs, cache, folds, ctx, say, expression, mirror) -> None:
    for k, fold in enumerate(split.folds):
        if folds is not None and k not in folds:
            continue
        setups: dict[bool, FoldSetup] = {}
        for spec in specs:
            fold_dir = out / spec.name / f"fold_{k}"
            if (fold_dir / "metrics.json").exists():
                continue
            if spec.needs_genes not in setups:
                setups[spec.needs_genes] = prepare_fold(cohort, fold, k, cfg, use_genes=spec.needs_genes, cache=cache)
            setup = setups[spec.needs_genes]
            if spec.kind in MIRROR_MODELS:
                outcome = None
                if ctx.is_main:
                    outcome = run_mirror_model(name=spec.name, setup=setup, run_dir=out, expression=expression,
                                               settings=mirror or MirrorSettings(), device=ctx.device, log=say)
                barrier(ctx)
                if outcome is not None:
                    shown = ", ".join(f"{m} {v:.3f}" for m, v in outcome.metrics.items() if v is not None)
                    say(f"{spec.name} fold {k}: {shown}")
                continue
            if spec.kind == "student":
                outcome = train_student_fold(setup=setup, teacher_dir=out / "teacher" / f"fold_{k}" / "best",
                                             out_dir=fold_dir, name=spec.name, ctx=ctx)
            else:
                outcome = train_supervised_fold(kind=spec.kind, name=spec.name, setup=setup, out_dir=fold_dir,
                                                cgc=spec.cgc, dev_weight=spec.dev_weight,
                                                subspace_split=spec.subspace_split,
                                                spatial_context=spec.spatial_context, ctx=ctx)
            shown = ", ".join(f"{m} {v:.3f}" for m, v in outcome.metrics.items() if v is not None)
            say(f"{spec.name} fold {k}: {shown} (best epoch {outcome.best_epoch}/{outcome.epochs_run})")


# -- reading a run back -----------------------------------------------------------------------


def fold_metrics(run_dir: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """``{model: [test metrics of fold 0, 1, ...]}`` from the finished folds' metrics.json."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DataError(f"run directory not found: {run}")
    results: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(run.glob("*/fold_*/metrics.json"), key=lambda p: (p.parent.parent.name, _fold_no(p))):
        document = json.loads(path.read_text())
        results.setdefault(document["model"], []).append(
            {k: (float("nan") if v is None else v) for k, v in document["test"].items()})
    if not results:
        raise DataError(f"{run}: no finished fold (no <model>/fold_<k>/metrics.json); is it a `dismm train` output?")
    order = {n: i for i, n in enumerate(KNOWN)}
    return dict(sorted(results.items(), key=lambda kv: order.get(kv[0], len(order))))


def _fold_no(path: Path) -> int:
    return int(path.parent.name.split("_")[-1])


def collect_summary(run_dir: str | os.PathLike[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per model, per metric: mean, sd and the fold values (JSON-ready)."""
    return summary_json(fold_metrics(run_dir))


def format_table(run_dir: str | os.PathLike[str]) -> str:
    """The summary as text: one row per model, cells "mean ± sd" over folds."""
    return summary_table(fold_metrics(run_dir)).to_string()


def write_summary(out: Path, summary: dict[str, dict[str, dict[str, Any]]]) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    rows = [{"model": model, "metric": metric, "mean": v["mean"], "sd": v["sd"], "n_folds": len(v["folds"])}
            for model, per in summary.items() for metric, v in per.items()]
    pd.DataFrame(rows).to_csv(out / "summary.csv", index=False)


def _pooled_predictions(model_dir: Path) -> pd.DataFrame | None:
    frames = []
    for path in sorted(model_dir.glob("fold_*/test_predictions.csv")):
        frame = pd.read_csv(path)
        if "risk" in frame:  # risk scales differ between folds: pool within-fold ranks
            frame["risk"] = frame["risk"].rank(pct=True)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else None


def write_figures(out: Path, cohort: Cohort) -> list[Path]:
    """ROC (classification) or Kaplan-Meier (survival) of pooled held-out predictions per
    model, and the training curves of each model's first fold."""
    from training.plots import plot_km, plot_roc, plot_training_curves

    written = []
    figures = out / "figures"
    for model_dir in sorted(p for p in out.iterdir() if p.is_dir() and p.name in KNOWN):
        pooled = _pooled_predictions(model_dir)
        if pooled is not None and cohort.task == "classification":
            names = list(cohort.class_names)
            index = {n: i for i, n in enumerate(names)}
            probs = pooled[[f"prob_{n}" for n in names]].to_numpy()
            y = pooled["label"].astype(str).map(index).to_numpy()
            written.append(plot_roc(y_true=y, probs=probs, class_names=names, path=figures / f"roc_{model_dir.name}.png",
                                    title=f"{model_dir.name}: ROC (held-out folds)"))
        elif pooled is not None:
            written.append(plot_km(times=pooled["time"].to_numpy(), events=pooled["event"].to_numpy(),
                                   risks=pooled["risk"].to_numpy(), path=figures / f"km_{model_dir.name}.png",
                                   title=f"{model_dir.name}: Kaplan-Meier (held-out folds)"))
        history = model_dir / "fold_0" / "history.json"
        if history.exists():
            rows = [{k: (math.nan if v is None else v) for k, v in r.items()} for r in json.loads(history.read_text())]
            if rows:
                written.append(plot_training_curves(history=rows, path=figures / f"training_{model_dir.name}.png",
                                                    title=f"{model_dir.name}: fold 0"))
    return written


def fold_attention_auroc(pred_attention: list[dict[str, dict[str, np.ndarray]]], regions: list[dict[str, np.ndarray]],
                         *, attention: str, region: str) -> float:
    """Mean over slides and magnifications of the AUROC with which an attention map ranks
    the patches of a planted region above the others (the disentanglement check)."""
    from sklearn.metrics import roc_auc_score

    scores = []
    for maps, truth in zip(pred_attention, regions):
        for mag, per in maps.items():
            positive = truth[mag] == region
            if positive.any() and (~positive).any():
                scores.append(roc_auc_score(positive, per[attention]))
    return float(np.mean(scores)) if scores else float("nan")
