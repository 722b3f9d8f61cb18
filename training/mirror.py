"""MIRROR on the DisMM protocol: label-free pretraining per fold, then probes on frozen encoders.

Why per fold: pretraining sees expression and slides, so pretraining on all patients
would let the test patients shape the features a probe is judged on. Each fold therefore
pretrains on its *training* patients only (a fixed schedule by default, see
``MirrorSettings.select``; no labels anywhere in pretraining), and the probes are fitted on the
training part, selected on the validation part and scored once on the test part, exactly
as the DisMM models are. Results land in the same run layout and metric keys:

    RUN/mirror_pretrain/fold_<k>/{history.csv, history.json, pretrained/}   (shared by the probes)
    RUN/<name>/fold_<k>/{metrics.json, test_predictions.csv, probe.json, best/}

- ``mirror_probe``: logistic regression (classification) or the discrete-time survival
  head (survival) on the standardised slide [CLS] embedding; ``best/`` is a complete
  MIRROR model directory (encoders + probe) that ``dismm predict`` loads.
- ``mirror_fewshot``: the same probe on 10 training patients per class (classification
  only; a survival run skips it).
- ``meanpool_probe``: the same probe on the mean of the raw patch features of the same
  magnifications (the reference point for the encoder); no model directory.

Genes: the RNA encoder reads the ``n_genes`` most variable genes of the *whole* expression
table (not only the gene sets), ranked on the training patients' log1p values: label-free
and fold-internal. They are z-scored with training statistics (stored in ``best/``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from napari_dismm.errors import DataError, ModelConfigError
from napari_dismm.model.checkpoint import load_model, save_model
from napari_dismm.model.mirror import Mirror
from napari_dismm.model.mirror.losses import mean_assignment_entropy
from napari_dismm.model.registry import build_model
from napari_dismm.omics import ExpressionNormaliser, read_expression
from napari_dismm.omics.expression import ExpressionTable
from training.dataset import SlideDataset, collate_bags
from training.engine import FoldOutcome, predictions_frame, score, seed_for
from training.metrics import write_history
from training.probes import (
    PROBE_CS,
    SURVIVAL_EPOCHS,
    SURVIVAL_LR,
    Frozen,
    fit_classification_probe,
    fit_survival_probe,
    frozen_features,
    mean_pooled,
    probe_predictions,
)
from training.stages.supervised import FoldSetup

MIRROR_MODELS = ("mirror_probe", "mirror_fewshot", "meanpool_probe")
PRETRAIN_DIR = "mirror_pretrain"


@dataclass(frozen=True)
class MirrorSettings:
    """MIRROR's settings (no TOML section yet: pass one to ``run_training(mirror=...)``).

    Architecture and loss weights default to the paper's (see ``MirrorConfig``), except
    ``n_prototypes`` (paper 3000; 64 here because a cohort of tens of patients cannot
    spread over thousands of prototypes) and ``d`` (0 = the run's ``[model] d``).

    ``select``: which pretraining epoch is kept. "last" (default): a fixed schedule, as
    self-supervised pretraining is usually run. "val_loss": the epoch with the lowest
    pretraining loss on the validation patients, stopping after ``patience`` epochs without
    improvement. On tens of patients the validation loss turns up (alignment overfits)
    long before the style clustering forms: measured on the planted cohort with decoys,
    3 folds, selection by validation loss kept epochs 7-18 and each slide's own prototype
    assignment was nearly flat (I(slide; prototype) 0.18 / 0.00 / 0.00 of log K, 5 / 2 / 2
    prototypes used), the last of 40 epochs 0.28 / 0.29 / 0.28 with 10 / 8 / 9 prototypes,
    at the same linear-probe AUC (0.807 against 0.808)."""

    magnifications: tuple[str, ...] = ("20x",)
    n_genes: int = 2000
    d: int = 0
    n_layers: int = 2
    n_prototypes: int = 64
    balance_weight: float = 1.0
    mask_ratio: float = 0.75
    dropout: float = 0.1
    epochs: int = 40
    lr: float = 5e-4
    weight_decay: float = 1e-4
    select: str = "last"
    patience: int = 0
    batch_size: int = 8
    max_patches: int = 4096
    few_shot: int = 10
    probe_cs: tuple[float, ...] = PROBE_CS
    survival_epochs: int = SURVIVAL_EPOCHS
    survival_lr: float = SURVIVAL_LR

    def __post_init__(self) -> None:
        checks = {
            "magnifications": bool(self.magnifications), "n_genes": self.n_genes >= 1, "d": self.d >= 0,
            "n_layers": self.n_layers >= 1, "n_prototypes": self.n_prototypes >= 2,
            "balance_weight": self.balance_weight >= 0,
            "mask_ratio": 0 < self.mask_ratio < 1, "dropout": 0 <= self.dropout < 1, "epochs": self.epochs >= 1,
            "lr": self.lr > 0, "weight_decay": self.weight_decay >= 0, "select": self.select in ("last", "val_loss"),
            "patience": self.patience >= 0 and (self.patience == 0 or self.select == "val_loss"),
            "batch_size": self.batch_size >= 2, "max_patches": self.max_patches >= 1, "few_shot": self.few_shot >= 1,
            "probe_cs": bool(self.probe_cs) and all(c > 0 for c in self.probe_cs),
            "survival_epochs": self.survival_epochs >= 1, "survival_lr": self.survival_lr > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ModelConfigError(f"invalid MirrorSettings value(s) for {', '.join(bad)} (batch_size needs >= 2 for CLIP; "
                                   "select is 'last' or 'val_loss'; patience needs select='val_loss')")


# -- genes --------------------------------------------------------------------------------------


def select_genes(table: ExpressionTable, patients: list[str], *, n_genes: int, log1p: bool) -> tuple[str, ...]:
    """The ``n_genes`` most variable genes over these (training) patients; no labels used.

    Genes missing for more than half of the patients are skipped; ties keep table order."""
    values = table.select(patients).values.astype(float)
    if log1p:
        values = np.log1p(np.clip(values, 0.0, None))
    observed = np.isfinite(values).mean(axis=0) >= 0.5
    with np.errstate(invalid="ignore"):
        variance = np.where(observed, np.nanvar(values, axis=0), -np.inf)
    order = np.argsort(-variance, kind="stable")
    keep = [int(i) for i in order[:n_genes] if np.isfinite(variance[i]) and variance[i] > 0]
    if not keep:
        raise DataError(f"{table.source}: no gene varies over the training patients")
    return tuple(table.columns[i] for i in sorted(keep))


@dataclass
class GeneInput:
    genes: tuple[str, ...]
    normaliser: ExpressionNormaliser
    vectors: dict[str, Tensor]  # patient -> (G,)


def gene_input(expression: str | os.PathLike[str] | ExpressionTable, patients: list[str], train: list[str], *,
               n_genes: int, log1p: bool) -> GeneInput:
    table = expression if isinstance(expression, ExpressionTable) else read_expression(expression)
    genes = select_genes(table, train, n_genes=n_genes, log1p=log1p)
    norm = ExpressionNormaliser(log1p=log1p).fit(table.select(train), list(genes))
    z = norm.transform(table.select(patients))
    return GeneInput(tuple(norm.genes_), norm, {p: torch.from_numpy(np.ascontiguousarray(z[i])) for i, p in enumerate(patients)})


# -- pretraining --------------------------------------------------------------------------------


def _mags(setup: FoldSetup, settings: MirrorSettings) -> tuple[str, ...]:
    mags = tuple(m for m in settings.magnifications if m in setup.cohort.magnifications)
    if not mags:
        raise DataError(f"MIRROR magnifications {list(settings.magnifications)} are not in the cohort "
                        f"({list(setup.cohort.magnifications)})")
    return mags


def _patients(dataset: SlideDataset) -> list[str]:
    return list(dict.fromkeys(s.patient_id for s in dataset.slides))


def _batches(n: int, size: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffled batches; a last batch of one joins the previous one (CLIP needs pairs)."""
    order = rng.permutation(n).tolist()
    out = [order[i:i + size] for i in range(0, n, size)]
    if len(out) > 1 and len(out[-1]) < 2:
        last = out.pop()
        out[-1] += last
    return out


def _footprints(batch, mags) -> dict[str, torch.Tensor] | None:
    """Each bag's patch footprint per magnification (the lattice of the positional convolution)."""
    return None if batch.footprints is None else {m: batch.footprints[m] for m in mags if m in batch.footprints}


def _pretrain_loss(model: Mirror, dataset: SlideDataset, idx: list[int], genes: GeneInput, mags, device):
    batch = collate_bags([dataset[i] for i in idx]).to(device)
    vectors = torch.stack([genes.vectors[p] for p in batch.patient_ids]).to(device)
    return model.pretrain_losses({m: batch.bags[m] for m in mags}, genes=vectors,
                                 coords={m: batch.coords[m] for m in mags}, masks={m: batch.masks[m] for m in mags},
                                 footprints=_footprints(batch, mags))


@torch.no_grad()
def _validate(model: Mirror, dataset: SlideDataset, genes: GeneInput, mags, settings, device, seed: int) -> dict[str, float]:
    """Pretraining loss on the validation patients (fixed masks) and the balance of their
    prototype assignments: entropy of the mean assignment / log K (1 = even, 0 = collapsed)."""
    model.eval()
    torch.manual_seed(seed)
    n = len(dataset)
    groups = _batches(n, settings.batch_size, np.random.default_rng(seed)) if n >= 2 else []
    total, probs = 0.0, []
    for idx in groups:
        loss, _ = _pretrain_loss(model, dataset, idx, genes, mags, device)
        total += float(loss) * len(idx) / n
    emb = embeddings(model, dataset, mags=mags, device=device)[0]
    probs = model.assignments(torch.from_numpy(emb).to(device))
    entropy = float(mean_assignment_entropy(probs)) / math.log(probs.shape[1])
    return {"val_loss": total if groups else float("nan"), "val_assignment_entropy": entropy}


def pretrain_fold(*, setup: FoldSetup, genes: GeneInput, settings: MirrorSettings, out_dir: Path,
                  device: torch.device | str = "cpu", log=None) -> Path:
    """Pretrain one fold's MIRROR (or reuse a finished one); returns the model directory."""
    model_dir = out_dir / "pretrained"
    if (model_dir / "config.json").exists():
        return model_dir
    cfg, k = setup.cfg, setup.index
    mags = _mags(setup, settings)
    torch.manual_seed(seed_for(cfg.cv.seed, "mirror", k, "init"))
    model = build_model({
        "kind": "mirror", "task": setup.task, "n_outputs": setup.n_outputs, "d_in": setup.d_in,
        "d": settings.d or cfg.model.d, "magnifications": mags, "n_genes": len(genes.genes),
        "n_layers": settings.n_layers, "n_heads": cfg.model.n_heads, "n_prototypes": settings.n_prototypes,
        "balance_weight": settings.balance_weight, "mask_ratio": settings.mask_ratio, "dropout": settings.dropout,
    }).to(device)
    train = SlideDataset(cohort=setup.cohort, patients=_patients(setup.data.train), bin_edges=setup.data.bin_edges,
                         max_patches=settings.max_patches, seed=seed_for(cfg.cv.seed, "mirror-patches", k),
                         cache=setup.data.train.cache)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    history, best, best_loss, bad, best_epoch = [], None, math.inf, 0, 0
    for epoch in range(settings.epochs):
        torch.manual_seed(seed_for(cfg.cv.seed, "mirror", k, epoch))
        train.set_epoch(epoch)
        model.train()
        sums: dict[str, float] = {}
        steps = _batches(len(train), settings.batch_size, np.random.default_rng(seed_for(cfg.cv.seed, "mirror-order", k, epoch)))
        for idx in steps:
            loss, parts = _pretrain_loss(model, train, idx, genes, mags, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for name, value in {"loss": loss, **parts}.items():
                sums[f"train_{name}"] = sums.get(f"train_{name}", 0.0) + float(value.detach()) / len(steps)
        row = {"epoch": epoch + 1, **sums, **_validate(model, setup.data.val, genes, mags, settings, device,
                                                        seed_for(cfg.cv.seed, "mirror-val", k))}
        history.append(row)
        value = row["val_loss"] if math.isfinite(row["val_loss"]) else row["train_loss"]
        if settings.select == "last" or value < best_loss:
            best_loss, bad, best_epoch = value, 0, epoch + 1
            best = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
        else:
            bad += 1
        if log is not None:
            log(f"mirror pretrain fold {k} epoch {epoch + 1}: train {row['train_loss']:.3f} val {row['val_loss']:.3f} "
                f"balance {row['val_assignment_entropy']:.2f}")
        if settings.patience and bad >= settings.patience:
            break
    model.load_state_dict(best)
    for row in history:
        row["best"] = row["epoch"] == best_epoch
    write_history(history, out_dir / "history")
    extra = {**_extras(setup, mags, genes), "model_name": "mirror_pretrained", "fold": k,
             "best_epoch": best_epoch,
             "probe": None}
    save_model(model, model_dir, extra=extra)
    return model_dir


def _extras(setup: FoldSetup, mags: tuple[str, ...], genes: GeneInput) -> dict[str, Any]:
    extra = setup.extras("mirror")
    extra.update({"magnifications": list(mags), "mirror_genes": list(genes.genes),
                  "mirror_normaliser": genes.normaliser.to_dict(), "trained_for": f"MIRROR probe, {setup.task}"})
    return extra


# -- frozen features ---------------------------------------------------------------------------


@torch.no_grad()
def embeddings(model: Mirror, dataset: SlideDataset, *, mags, device="cpu") -> tuple[np.ndarray, Frozen]:
    """(n, d) slide [CLS] embeddings (eval mode, whole bags)."""
    model.eval()

    def feats(batch):
        batch = batch.to(device)
        return model.embed({m: batch.bags[m] for m in mags}, coords={m: batch.coords[m] for m in mags},
                           masks={m: batch.masks[m] for m in mags},
                           footprints=_footprints(batch, mags)).float().cpu().numpy()

    frozen = frozen_features(dataset, feats)
    return frozen.x, frozen


# -- probes ------------------------------------------------------------------------------------


def few_shot(data: Frozen, *, per_class: int, seed: int) -> Frozen:
    """The slides of ``per_class`` randomly drawn training patients of each class."""
    rng = np.random.default_rng(seed)
    patients: list[str] = []
    for c in sorted(set(data.target.tolist())):
        members = sorted({p for p, t in zip(data.patient_ids, data.target) if t == c})
        patients += [members[i] for i in sorted(rng.permutation(len(members))[:per_class])]
    keep = np.array([p in set(patients) for p in data.patient_ids])
    pick = lambda a: None if a is None else a[keep]  # noqa: E731
    return Frozen(data.x[keep], [s for s, k in zip(data.slide_ids, keep) if k], [p for p, k in zip(data.patient_ids, keep) if k],
                  data.target[keep], pick(data.event), pick(data.time))


# -- one model on one fold ------------------------------------------------------------------


def run_mirror_model(*, name: str, setup: FoldSetup, run_dir: Path, expression, settings: MirrorSettings,
                     device: torch.device | str = "cpu", log=None) -> FoldOutcome | None:
    """Train and score ``name`` (one of :data:`MIRROR_MODELS`) on one fold; None if skipped."""
    if name not in MIRROR_MODELS:
        raise DataError(f"unknown MIRROR model {name!r}; choose from {', '.join(MIRROR_MODELS)}")
    k, task = setup.index, setup.task
    fold_dir = run_dir / name / f"fold_{k}"
    if (fold_dir / "metrics.json").exists():
        saved = json.loads((fold_dir / "metrics.json").read_text())
        return FoldOutcome(saved["test"], saved["best_epoch"], saved["epochs_run"], [], skipped=True)
    if name == "mirror_fewshot" and task != "classification":
        if log is not None:
            log(f"mirror_fewshot fold {k}: skipped (few-shot is defined per class; this is a {task} run)")
        return None
    mags = _mags(setup, settings)
    cache = setup.data.train.cache
    parts = {part: SlideDataset(cohort=setup.cohort, patients=_patients(getattr(setup.data, part)),
                                bin_edges=setup.data.bin_edges, cache=cache) for part in ("train", "val", "test")}
    model = None
    if name == "meanpool_probe":
        frozen = {part: mean_pooled(ds, mags=mags) for part, ds in parts.items()}
    else:
        everyone = list(setup.cohort.patients)
        genes = gene_input(expression, everyone, _patients(setup.data.train), n_genes=settings.n_genes,
                           log1p=setup.cfg.data.log1p)
        pre_dir = pretrain_fold(setup=setup, genes=genes, settings=settings, out_dir=run_dir / PRETRAIN_DIR / f"fold_{k}",
                                device=device, log=log)
        model, document = load_model(pre_dir, map_location=device)
        frozen = {part: embeddings(model, ds, mags=mags, device=device)[1] for part, ds in parts.items()}
    train = few_shot(frozen["train"], per_class=settings.few_shot, seed=seed_for(setup.cfg.cv.seed, "few", k)) \
        if name == "mirror_fewshot" else frozen["train"]
    seed = seed_for(setup.cfg.cv.seed, name, k)
    if task == "classification":
        probe = fit_classification_probe(train, frozen["val"], n_classes=setup.n_outputs, cs=settings.probe_cs,
                                         select_on=setup.cfg.cv.select_on, seed=seed)
    else:
        probe = fit_survival_probe(train, frozen["val"], n_bins=setup.n_outputs, epochs=settings.survival_epochs,
                                   lr=settings.survival_lr, seed=seed)
    test = probe_predictions(probe, frozen["test"], task=task)
    metrics = score(test, task=task)
    fold_dir.mkdir(parents=True, exist_ok=True)
    predictions_frame(test, task=task, class_names=setup.cohort.class_names).to_csv(fold_dir / "test_predictions.csv", index=False)
    info = {"probe": probe.chosen, "n_train_slides": len(train.slide_ids), "n_train_patients": len(set(train.patient_ids)),
            "features": "mean-pooled patch features" if model is None else "MIRROR slide [CLS]",
            "settings": asdict(settings)}
    (fold_dir / "probe.json").write_text(json.dumps(info, indent=1, default=float) + "\n")
    if model is not None:
        with torch.no_grad():
            model.feature_mean.copy_(torch.from_numpy(probe.mean).float())
            model.feature_std.copy_(torch.from_numpy(probe.std).float())
            model.head.linear.weight.copy_(torch.from_numpy(probe.weight).float())
            model.head.linear.bias.copy_(torch.from_numpy(probe.bias).float())
        extra = {k_: v for k_, v in document.items() if k_ not in ("model", "model_id", "format_version")}
        save_model(model, fold_dir / "best", extra={**extra, "model_name": name, "probe": probe.chosen})
    document = {"model": name, "fold": k, "task": task, "best_epoch": 0, "epochs_run": 0,
                "n_test_patients": len(set(test.patient_ids)),
                "test": {m: (v if math.isfinite(v) else None) for m, v in metrics.items()}}
    tmp = fold_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(tmp, fold_dir / "metrics.json")
    return FoldOutcome(metrics, 0, 0, [], test)
