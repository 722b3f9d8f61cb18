"""`dismm inspect`: how well did the tumor and TME subspaces separate, over a finished run?

For every model of a run directory (``RUN/<model>/fold_<k>/best``) with tumor and TME
features (the teacher, its ablations such as ``teacher_no_split``, the student), on each
fold's held-out patients only:

- linear CKA and mean cosine between the tumor and the TME slide features, per
  magnification (computed per fold, in that fold's model's feature space);
- 10x vs 20x attention consistency per slide (DEV's target), on the common 10x grid;
- for teachers, integrated-gradients attribution of each subspace's logit to the genes
  (top genes per subspace, share taken from each gene group);
- a PCA of slide features coloured by label (or survival time).

Writes ``OUT/similarity.png``, ``OUT/consistency.png``, ``OUT/attribution_<model>.png``,
``OUT/projection_<model>.png`` and ``OUT/summary.json``. The run directory does not record
where its cohort came from, so the cohort files are passed again (as to `dismm train`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_dismm.errors import DataError, ModelConfigError
from napari_dismm.inspect.attribution import integrated_gradients, top_genes
from napari_dismm.inspect.cka import subspace_similarity
from napari_dismm.inspect.consistency import slide_consistency
from napari_dismm.inspect.projection import pca_2d
from napari_dismm.model.checkpoint import load_model
from napari_dismm.omics import ExpressionNormaliser
from training.cohort import Cohort, load_cohort
from training.config import load_config
from training.dataset import BagCache, SlideDataset, collate_bags, saved_bin_edges
from training.run import CONFIG_FILE, KNOWN, SPLIT_FILE
from training.splits import Split

SUBSPACES = ("tumor", "tme")
GENE_KINDS = ("teacher", "late_fusion")


@dataclass
class FoldOutputs:
    """One model on one fold's held-out slides (unpadded, per slide)."""

    slide_ids: list[str] = field(default_factory=list)
    patient_ids: list[str] = field(default_factory=list)
    features: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=dict)  # mag -> u -> [(d,)]
    attention: list[dict[str, dict[str, np.ndarray]]] = field(default_factory=list)
    coords: list[dict[str, np.ndarray]] = field(default_factory=list)
    target: list[int] = field(default_factory=list)


@torch.no_grad()
def fold_outputs(model: torch.nn.Module, dataset: SlideDataset, *, batch_size: int = 8) -> FoldOutputs:
    """Eval-mode forward over whole bags: features, attention and coordinates per slide."""
    model.eval()
    result = FoldOutputs()
    for start in range(0, len(dataset), batch_size):
        batch = collate_bags([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        out = model(batch.bags, **batch.model_kwargs())
        result.slide_ids += batch.slide_ids
        result.patient_ids += batch.patient_ids
        result.target += batch.target.tolist()
        for mag, per in out.features.items():
            for u in SUBSPACES:
                if u in per:
                    result.features.setdefault(mag, {}).setdefault(u, []).extend(per[u].float().numpy())
        for b in range(len(batch)):
            keep = {mag: batch.masks[mag][b] for mag in out.attention}
            result.attention.append({mag: {u: a[b][keep[mag]].numpy() for u, a in per.items()}
                                     for mag, per in out.attention.items()})
            result.coords.append({mag: batch.coords[mag][b][keep[mag]].numpy() for mag in out.attention})
    return result


def _models_in(run: Path, wanted: Sequence[str] | None) -> list[str]:
    found = sorted((p.name for p in run.iterdir() if p.is_dir() and any(p.glob("fold_*/best/config.json"))),
                   key=lambda n: (list(KNOWN).index(n) if n in KNOWN else len(KNOWN), n))
    if wanted:
        missing = [n for n in wanted if n not in found]
        if missing:
            raise DataError(f"{run}: no trained model {missing[0]!r} (found: {', '.join(found) or 'none'})")
        return list(wanted)
    if not found:
        raise DataError(f"{run}: no trained model (no <model>/fold_<k>/best/config.json); is it a `dismm train` output?")
    return found


def _folds_of(run: Path, model: str) -> list[int]:
    return sorted(int(p.parent.parent.name.split("_")[-1]) for p in (run / model).glob("fold_*/best/config.json"))


def _summary_stats(values: Sequence[float]) -> dict[str, Any]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else None
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else (0.0 if finite else None)
    return {"mean": mean, "sd": sd, "folds": [None if v is None or not math.isfinite(v) else float(v) for v in values]}


def _load_run_cohort(run: Path, *, cohort_csv, expression, gene_sets, task: str) -> Cohort:
    cfg = load_config(run / CONFIG_FILE) if (run / CONFIG_FILE).exists() else None
    mags = cfg.data.magnifications if cfg is not None else ("10x", "20x")
    log1p = cfg.data.log1p if cfg is not None else True
    return load_cohort(cohort_csv=cohort_csv, expression=expression, gene_sets=gene_sets, task=task,
                       magnifications=mags, log1p=log1p)


def inspect_run(
    run_dir: str | os.PathLike[str],
    *,
    cohort_csv: str | os.PathLike[str],
    expression: str | os.PathLike[str] | None,
    gene_sets: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str],
    models: Sequence[str] | None = None,
    ig_steps: int = 8,
    top_k: int = 10,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Compute the disentanglement figures of a finished run; returns ``summary.json``."""
    from napari_dismm.inspect import figures

    run, out = Path(run_dir), Path(out)
    if not run.is_dir():
        raise DataError(f"run directory not found: {run}")
    if not (run / SPLIT_FILE).exists():
        raise DataError(f"{run} has no {SPLIT_FILE}; is it a `dismm train` output?")
    names = _models_in(run, models)
    split = Split.load(run / SPLIT_FILE)
    first = json.loads((run / names[0] / f"fold_{_folds_of(run, names[0])[0]}" / "best" / "config.json").read_text())
    task = str(first["model"].get("task", "classification"))
    cohort = _load_run_cohort(run, cohort_csv=cohort_csv, expression=expression, gene_sets=gene_sets, task=task)
    cache = BagCache()
    say = log or (lambda _m: None)
    summary: dict[str, Any] = {"run": str(run), "task": task, "models": {}}
    similarity_plot, consistency_plot, written = {}, {}, []
    for name in names:
        sims: dict[str, dict[str, list[float]]] = {}
        cons: dict[str, list[float]] = {u: [] for u in SUBSPACES}
        cons_cos: dict[str, list[float]] = {u: [] for u in SUBSPACES}
        attributions: dict[str, dict[str, list[np.ndarray]]] = {}
        gene_names: dict[str, list[str]] = {}
        projection_rows: list[tuple[np.ndarray, np.ndarray, Any]] = []
        kind = None
        folds = _folds_of(run, name)
        for k in folds:
            if k >= split.n_folds:
                raise DataError(f"{run}/{name}/fold_{k}: the split has only {split.n_folds} folds")
            model, doc = load_model(run / name / f"fold_{k}" / "best")
            kind = doc["model"]["kind"]
            if kind == "genes_only":
                say(f"{name}: reads no slide (kind {kind}); skipped")
                break
            norm = None
            if kind in GENE_KINDS:
                if cohort.expression is None:
                    raise DataError(f"{name} reads expression: pass the run's expression table")
                norm = ExpressionNormaliser.from_dict(doc["normaliser"])
            dataset = SlideDataset(cohort=cohort, patients=split.folds[k].test, normaliser=norm, cache=cache,
                                   bin_edges=saved_bin_edges(doc) if task == "survival" else None)
            outputs = fold_outputs(model, dataset)
            if not outputs.features or not all(set(SUBSPACES) <= set(per) for per in outputs.features.values()):
                say(f"{name}: no tumor/TME features (kind {kind}); skipped")
                break
            for mag, per in outputs.features.items():
                sim = subspace_similarity(np.stack(per["tumor"]), np.stack(per["tme"]))
                for key in ("cka", "cosine"):
                    sims.setdefault(mag, {}).setdefault(key, []).append(sim[key])
            if {"10x", "20x"} <= set(outputs.coords[0]):
                fallback = float(doc.get("patch_size_10x_level0") or doc["model"].get("patch_size_10x_level0", 448.0))
                for slide_id, coords, attention in zip(outputs.slide_ids, outputs.coords, outputs.attention):
                    # each slide's own footprints (a cohort mixes scanners); the model's only if unknown
                    own = _footprints(dataset, slide_id)
                    per_slide = slide_consistency(coords, attention, patch_size_10x_level0=own.get("10x") or fallback,
                                                  patch_size_20x_level0=own.get("20x"))
                    for u, stats in per_slide.items():
                        cons[u].append(stats["spearman"])
                        cons_cos[u].append(stats["cosine"])
            finest = list(outputs.features)[-1]
            labels = _labels(cohort, outputs)
            for i in range(len(outputs.slide_ids)):
                projection_rows.append((outputs.features[finest]["tumor"][i], outputs.features[finest]["tme"][i], labels[i]))
            if kind == "teacher":
                ig = _fold_attribution(model, dataset, task=task, steps=ig_steps)
                for u, per_group in ig.items():
                    for group, values in per_group.items():
                        attributions.setdefault(u, {}).setdefault(group, []).append(values)
                gene_names = {"tumor": list(doc["tumor_genes"]), "tme": list(doc["tme_genes"])}
            say(f"{name} fold {k}: " + ", ".join(f"CKA {m} {sims[m]['cka'][-1]:.3f}" for m in sims))
        if not sims:
            continue
        entry: dict[str, Any] = {"kind": kind, "folds": folds,
                                 "similarity": {m: {key: _summary_stats(v) for key, v in per.items()}
                                                for m, per in sims.items()},
                                 "consistency": {u: {"spearman": _summary_stats(cons[u]),
                                                     "cosine": _summary_stats(cons_cos[u])}
                                                 for u in SUBSPACES if cons[u]}}
        for stats in entry["consistency"].values():  # per slide, not per fold: no fold list
            for v in stats.values():
                v["slides"] = v.pop("folds")
        similarity_plot[name] = sims
        consistency_plot[name] = cons
        if attributions:
            merged = {u: {g: np.concatenate(v) for g, v in per.items()} for u, per in attributions.items()}
            entry["attribution"] = top_genes(merged, gene_names, k=top_k)
            written.append(figures.plot_attribution(entry["attribution"], out / f"attribution_{name}.png",
                                                    title=f"{name}: gene attribution per subspace (IG, held-out)"))
        if len(projection_rows) >= 3:
            tumor = np.stack([r[0] for r in projection_rows])
            tme = np.stack([r[1] for r in projection_rows])
            colour = [r[2] for r in projection_rows]
            coords, ratios = {}, {}
            for label, x in (("tumor", tumor), ("TME", tme), ("tumor + TME", np.concatenate([tumor, tme], 1))):
                coords[label], ratios[label] = pca_2d(x)
            written.append(figures.plot_projection(
                coords, ratios, colour, out / f"projection_{name}.png", title=f"{name}: PCA of held-out slide features",
                colour_label="label" if task == "classification" else "time", categorical=task == "classification"))
            entry["projection_explained_variance"] = {k: [float(v) for v in r] for k, r in ratios.items()}
        summary["models"][name] = entry
    if not summary["models"]:
        raise DataError(f"{run}: none of {', '.join(names)} has tumor and TME features to compare")
    written.insert(0, figures.plot_similarity(similarity_plot, out / "similarity.png"))
    written.insert(1, figures.plot_consistency(consistency_plot, out / "consistency.png"))
    summary["figures"] = [p.name for p in written]
    summary = _strict(summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    return summary


def _strict(value: Any) -> Any:
    """JSON-ready: non-finite floats become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _labels(cohort: Cohort, outputs: FoldOutputs) -> list[Any]:
    by_slide = {s.slide_id: s for s in cohort.slides}
    if cohort.task == "classification":
        return [by_slide[s].label for s in outputs.slide_ids]
    return [by_slide[s].time for s in outputs.slide_ids]


def _footprints(dataset: SlideDataset, slide_id: str) -> dict[str, float | None]:
    """The slide's patch side in level-0 px per magnification (its feature files', issue 14)."""
    record = next(r for r in dataset.slides if r.slide_id == slide_id)
    return {mag: dataset.cache.footprint(path) for mag, path in record.features.items()}


def _fold_attribution(model, dataset: SlideDataset, *, task: str, steps: int,
                      batch_size: int = 8) -> dict[str, dict[str, np.ndarray]]:
    """IG per held-out slide; the target class is the one the model predicts."""
    parts: dict[str, dict[str, list[np.ndarray]]] = {}
    for start in range(0, len(dataset), batch_size):
        batch = collate_bags([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        if batch.genes is None:
            raise ModelConfigError("gene attribution needs the expression vectors of the slides")
        target = None
        if task == "classification":
            with torch.no_grad():
                target = model(batch.bags, **batch.model_kwargs()).logits.argmax(-1)
        ig = integrated_gradients(model, batch.bags, masks=batch.masks, genes=batch.genes, target=target, steps=steps,
                                  coords=batch.coords, footprints=batch.footprints)
        for u, per in ig.items():
            for g, v in per.items():
                parts.setdefault(u, {}).setdefault(g, []).append(v.numpy())
    return {u: {g: np.concatenate(v) for g, v in per.items()} for u, per in parts.items()}


def headline(summary: dict[str, Any]) -> str:
    """One line per model: CKA per magnification (mean over folds) and 10x/20x consistency."""
    lines = []
    for name, entry in summary["models"].items():
        cka = ", ".join(f"{m} {v['cka']['mean']:.3f}" for m, v in entry["similarity"].items()
                        if v["cka"]["mean"] is not None)
        cons = ", ".join(f"{u} {v['spearman']['mean']:.2f}" for u, v in entry["consistency"].items()
                         if v["spearman"]["mean"] is not None)
        lines.append(f"{name}: tumor-vs-TME CKA {cka}" + (f"; 10x-vs-20x Spearman {cons}" if cons else ""))
    return "\n".join(lines)
