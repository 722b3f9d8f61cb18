"""Linear probes on frozen slide features: fitted by a convex solver, the penalty chosen on validation.

Why here and not in one model's module: the same probes are a baseline (``meanpool_probe``,
MIRROR's ``mirror_probe``) and the frozen linear paths of the teacher and the student
(``model.probes.FrozenProbe``, training/stages): a logistic regression on mean-pooled patch
features, with its C picked on ~10 validation patients, beat every attention model trained
by gradient descent on ~43 patients where the signal is weak and spread (issue 13).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from napari_dismm.errors import DataError
from napari_dismm.model.heads import describe_logits
from napari_dismm.model.losses import survival_nll
from napari_dismm.model.probes import FrozenProbe, masked_mean
from training.dataset import FoldData, SlideDataset, collate_bags
from training.engine import Predictions, score
from training.map_scorers import fit_map_scorers

#: the penalties a classification probe chooses from (sklearn's C, inverse strength)
PROBE_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
#: a survival probe's full-batch AdamW schedule (its epoch picked on the validation NLL)
SURVIVAL_EPOCHS, SURVIVAL_LR = 400, 1e-2


@dataclass
class Frozen:
    """Frozen slide features of one dataset with what scoring needs."""

    x: np.ndarray
    slide_ids: list[str]
    patient_ids: list[str]
    target: np.ndarray
    event: np.ndarray | None
    time: np.ndarray | None


def frozen_features(dataset: SlideDataset, features) -> Frozen:
    xs, slides, patients, target, event, time = [], [], [], [], [], []
    for i in range(0, len(dataset), 8):
        batch = collate_bags([dataset[j] for j in range(i, min(i + 8, len(dataset)))])
        xs.append(features(batch))
        slides += batch.slide_ids
        patients += batch.patient_ids
        target.append(batch.target.numpy())
        if batch.event is not None:
            event.append(batch.event.numpy())
            time.append(batch.time.numpy())
    return Frozen(np.concatenate(xs), slides, patients, np.concatenate(target),
                  np.concatenate(event) if event else None, np.concatenate(time) if time else None)



def mean_pooled(dataset: SlideDataset, *, mags) -> Frozen:
    """Mean of the raw patch features per magnification, concatenated (the baseline)."""

    def feats(batch):
        parts = []
        for m in mags:
            parts.append(masked_mean(batch.bags[m], batch.masks[m].bool()).numpy())
        return np.concatenate(parts, axis=1)

    return frozen_features(dataset, feats)


@dataclass
class LinearProbe:
    """logits = ((x - mean) / std) @ weight.T + bias; ``chosen``: what validation picked."""

    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    chosen: dict[str, Any]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    std = x.std(axis=0)
    return x.mean(axis=0), np.where(std < 1e-8, 1.0, std)


def fit_classification_probe(train: Frozen, val: Frozen, *, n_classes: int, cs, select_on: str, seed: int) -> LinearProbe:
    """Logistic regression (balanced class weights) for each C; C picked on validation."""
    from sklearn.linear_model import LogisticRegression

    mean, std = _standardise(train.x)
    z = (train.x - mean) / std
    results = []
    for c in cs:
        lr = LogisticRegression(C=c, max_iter=5000, class_weight="balanced", random_state=seed).fit(z, train.target)
        weight, bias = np.zeros((n_classes, z.shape[1])), np.full(n_classes, -30.0)  # absent class: never chosen
        rows = lr.classes_.astype(int)
        if len(rows) == 2:  # binary sklearn: one row; the pair of logits (0, w x + b) gives the same softmax
            weight[rows[0]], bias[rows[0]] = 0.0, 0.0
            weight[rows[1]], bias[rows[1]] = lr.coef_[0], lr.intercept_[0]
        else:
            weight[rows], bias[rows] = lr.coef_, lr.intercept_
        probe = LinearProbe(mean, std, weight, bias, {"C": c})
        pred = probe_predictions(probe, val, task="classification")
        loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(pred.logits), torch.from_numpy(val.target).long()))
        value = loss if select_on == "loss" else -score(pred, task="classification")["auc"]
        results.append((value if math.isfinite(value) else math.inf, probe))
    best = min(results, key=lambda r: r[0])
    best[1].chosen["val_" + ("loss" if select_on == "loss" else "neg_auc")] = best[0]
    return best[1]


def fit_survival_probe(train: Frozen, val: Frozen, *, n_bins: int, epochs: int, lr: float, seed: int,
                       patience: int = 50) -> LinearProbe:
    """The discrete-time survival head (Linear -> hazards, same NLL as DisMM) on frozen
    standardised features; the epoch is picked on the validation NLL."""
    mean, std = _standardise(train.x)
    zt = torch.from_numpy((train.x - mean) / std).float()
    zv = torch.from_numpy((val.x - mean) / std).float()
    bt, et = torch.from_numpy(train.target).long(), torch.from_numpy(train.event).float()
    bv, ev = torch.from_numpy(val.target).long(), torch.from_numpy(val.event).float()
    torch.manual_seed(seed)
    head = torch.nn.Linear(zt.shape[1], n_bins)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    best, best_loss, bad, best_epoch = None, math.inf, 0, 0
    for epoch in range(epochs):
        optimizer.zero_grad()
        survival_nll(head(zt), bt, et).backward()
        optimizer.step()
        with torch.no_grad():
            loss = float(survival_nll(head(zv), bv, ev))
        if loss < best_loss:
            best_loss, bad, best_epoch = loss, 0, epoch + 1
            best = (head.weight.detach().numpy().copy(), head.bias.detach().numpy().copy())
        else:
            bad += 1
            if bad >= patience:
                break
    return LinearProbe(mean, std, best[0].astype(float), best[1].astype(float),
                       {"epochs": best_epoch, "val_loss": best_loss})


def probe_predictions(probe: LinearProbe, data: Frozen, *, task: str) -> Predictions:
    logits = torch.from_numpy(probe.logits(data.x)).float()
    derived = {k: v.numpy() for k, v in describe_logits(logits, task=task).items()}
    return Predictions(data.slide_ids, data.patient_ids, logits.numpy(), data.target, derived.get("probabilities"),
                       derived.get("risk"), derived.get("survival"), data.event, data.time)


def gene_vectors(dataset: SlideDataset) -> Frozen:
    """Each slide's normalised tumor and TME gene vectors, concatenated (the teacher's order)."""
    return frozen_features(dataset, lambda batch: torch.cat([batch.genes["tumor"], batch.genes["tme"]], dim=1).numpy())


def fit_probe(train: Frozen, val: Frozen, *, task: str, n_outputs: int, select_on: str, seed: int) -> LinearProbe:
    """The classification or survival probe of ``task`` (penalty or epoch chosen on ``val``)."""
    if task == "classification":
        return fit_classification_probe(train, val, n_classes=n_outputs, cs=PROBE_CS, select_on=select_on, seed=seed)
    return fit_survival_probe(train, val, n_bins=n_outputs, epochs=SURVIVAL_EPOCHS, lr=SURVIVAL_LR, seed=seed)


def load_probe(target: FrozenProbe, probe: LinearProbe) -> None:
    target.set_fit(mean=probe.mean, scale=probe.std, weight=probe.weight, bias=probe.bias)


def whole_bags(dataset: SlideDataset, data: FoldData) -> SlideDataset:
    """``dataset``'s slides without training's patch cap: a probe reads each slide's mean over
    all its patches, as at inference (a capped bag is one spatial block, which may miss the
    region that carries the label)."""
    if dataset.max_patches is None:
        return dataset
    patients = list(dict.fromkeys(s.patient_id for s in dataset.slides))
    return SlideDataset(cohort=dataset.cohort, patients=patients, normaliser=data.normaliser,
                        bin_edges=data.bin_edges, cache=dataset.cache)


def probe_inputs(model: torch.nn.Module, dataset: SlideDataset) -> Frozen:
    """What a student's slide probe reads (``Student.probe_inputs``), for every slide."""

    @torch.no_grad()
    def feats(batch):
        masks = {m: mask.bool() for m, mask in batch.masks.items()}
        return model.probe_inputs(batch.bags, masks, coords=batch.coords, footprints=batch.footprints).float().numpy()

    return frozen_features(dataset, feats)


def fit_frozen_paths(model: torch.nn.Module, data: FoldData, *, task: str, n_outputs: int, select_on: str,
                     seed: int, teacher: torch.nn.Module | None = None,
                     device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """Fit a model's frozen probes (``slide_probe`` on every magnification's mean patch
    features, ``gene_probe`` if it has one) on the fold's training part, each penalty chosen
    on its validation part, and load them into it; returns what validation chose per probe
    (None for a model without probes). A student with map scorers (``probe_pooling``
    "teacher_maps") has them fitted to ``teacher``'s maps first (training/map_scorers.py), and
    its slide probe reads the mean and the score-pooled features.

    The model's own part is then trained without them (``with_probes=False``): tried the
    other way, trained on its own logits plus the probes' (cross-fitted on the training
    patients), the attention lost its training signal wherever the probes alone fit the
    training patients, and the student's held-out tumor maps on the demo recipe's rendered
    cohort fell from 0.95 / 0.86 / 0.87 to 0.66 / 0.77 / 0.58 (README)."""
    if getattr(model, "slide_probe", None) is None:
        return None
    mags = list(model.config.magnifications)
    whole = whole_bags(data.train, data)
    chosen = {}
    if getattr(model, "map_scorers", None) is not None:
        if teacher is None:
            raise DataError("the student's map scorers are fitted to a teacher's maps: none was given")
        chosen["map_scorers"] = fit_map_scorers(model, teacher, whole, data.val, seed=seed, device=device)
        parts = {"slide": (model.slide_probe, probe_inputs(model, whole), probe_inputs(model, data.val))}
    else:
        parts = {"slide": (model.slide_probe, mean_pooled(whole, mags=mags), mean_pooled(data.val, mags=mags))}
    if getattr(model, "gene_probe", None) is not None:
        parts["genes"] = (model.gene_probe, gene_vectors(data.train), gene_vectors(data.val))
    for name, (target, train, val) in parts.items():
        if task == "classification" and len(set(train.target.tolist())) < 2:
            chosen[name] = {"skipped": "the training part has one class"}  # the probe stays 0: adds nothing
            continue
        probe = fit_probe(train, val, task=task, n_outputs=n_outputs, select_on=select_on, seed=seed)
        load_probe(target, probe)
        chosen[name] = probe.chosen
    return chosen


def reuse_slide_probe(model: torch.nn.Module, source: torch.nn.Module, chosen: dict[str, Any] | None) -> dict[str, Any] | None:
    """Copy ``source``'s fitted slide probe into ``model`` (the fold's teacher into its
    student): both are fitted on the same fold's whole training slides, so a refit would read
    every training slide again for the same result. Returns what the source's validation chose
    (``chosen``, from its config.json), or None when there is nothing of the same shape to copy
    (a student whose probe also reads map-pooled features is fitted on its own)."""
    target, fitted = getattr(model, "slide_probe", None), getattr(source, "slide_probe", None)
    if target is None or fitted is None or not chosen or "slide" not in chosen:
        return None
    if any(a.shape != b.shape for a, b in zip(target.buffers(), fitted.buffers())):
        return None
    target.load_state_dict(fitted.state_dict())
    return {"slide": {**chosen["slide"], "from": "teacher"}}
