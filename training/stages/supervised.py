"""Stage I: the multi-modal teacher (and the baselines, trained the same supervised way).

Teacher loss per step, documented choice:
    L = L_task(combined logits) + mean over magnifications of L_task(logits at m)
        + slide_aux_weight * mean over magnifications of L_task(slide-only logits at m)
        + dev_weight * L_DEV   (from epoch ``dev_warmup`` on)
With probes (``[teacher] probes``) every term, and the validation that selects the epoch, read
the teacher's own logits, without the probes' (training/probes.py); the test reads its
prediction, with them.
The combined logits follow ``combine`` (the teacher: ``[model] combine``, the reference's max
confidence by default, which passes each sample's gradient to one magnification; ABMIL and
late fusion: ``[baselines] combine``, the mean of the probabilities by default). The
per-magnification terms keep both magnifications' heads trained, which either rule and DEV
rely on. CGC (``model.cgc.CGCStep``) acts on every fusion head
between backward and the optimizer step. ABMIL and late fusion use the same loss without
DEV and CGC (they have no subspaces), through the same engine.

What a fold fits (normaliser, bin edges, class weights) comes from its training patients
only, and travels with the saved model in ``best/config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from napari_dismm.features.encoders.provenance import model_record
from napari_dismm.features.h5 import read_features
from napari_dismm.model.cgc import CGCStep
from napari_dismm.model.losses import class_weights_from_labels, dev_loss_from_output, task_loss
from napari_dismm.model.probes import own_outputs
from napari_dismm.model.registry import build_model
from napari_dismm.model.teacher import SLIDE_LOGITS
from training.cohort import Cohort
from training.config import TrainConfig
from training.dataset import Batch, BagCache, FoldData, fold_datasets
from training.ddp import SINGLE, DistContext
from training.engine import FoldOutcome, LoopSettings, seed_for, train_fold
from training.probes import fit_frozen_paths
from training.splits import Fold

@dataclass
class FoldSetup:
    """One fold's data and what was fitted or read for it."""

    cohort: Cohort
    index: int
    data: FoldData
    cfg: TrainConfig
    d_in: int
    patch_size: int | None
    patch_size_10x_level0: float
    encoder: dict[str, Any]
    class_weights: Tensor | None

    @property
    def task(self) -> str:
        return self.cohort.task

    @property
    def n_outputs(self) -> int:
        if self.task == "classification":
            return len(self.cohort.class_names)
        return len(self.data.bin_edges) - 1

    def extras(self, name: str) -> dict[str, Any]:
        """What ``best/config.json`` carries for prediction (keys read by predict.py)."""
        norm = self.data.normaliser
        extra: dict[str, Any] = {
            "trained_for": self.task,
            "model_name": name,
            **self.encoder,
            "magnifications": list(self.cohort.magnifications),
            "patch_size": self.patch_size,
            "patch_size_10x_level0": self.patch_size_10x_level0,
            "normaliser": None if norm is None else norm.to_dict(),
            "tumor_genes": None if norm is None else list(norm.groups_["tumor"]),
            "tme_genes": None if norm is None else list(norm.groups_["tme"]),
        }
        if self.task == "classification":
            extra["class_names"] = list(self.cohort.class_names)
        else:
            extra["bin_edges"] = [float(e) for e in self.data.bin_edges]
        return extra


def _patch_info(cohort: Cohort, patients: tuple[str, ...]) -> tuple[int, int | None, float, dict[str, Any]]:
    """(d_in, patch size, 10x patch footprint in level-0 px, encoder record: recipe, weights
    hash and pixel pipeline, which ``dismm predict`` checks) from one training slide.

    The footprint is only the models' fallback (``patch_size_10x_level0``) for a bag whose
    own is unknown: every bag carries its own (``Batch.footprints``, issue 14)."""
    slide = cohort.slides_of(patients)[0]
    first = read_features(slide.features[cohort.magnifications[0]])
    mag10 = "10x" if "10x" in cohort.magnifications else cohort.magnifications[0]
    ff = first if mag10 == cohort.magnifications[0] else read_features(slide.features[mag10])
    size = ff.patch_size_level0
    if size is None:  # no attribute: the lattice step of the coordinates
        steps = np.diff(np.unique(ff.coords[:, 0]))
        size = int(steps[steps > 0].min()) if (steps > 0).any() else 448
    return first.dim, first.patch_size, float(size), model_record(first)


def prepare_fold(
    cohort: Cohort, fold: Fold, index: int, cfg: TrainConfig, *, use_genes: bool, cache: BagCache | None = None
) -> FoldSetup:
    data = fold_datasets(
        cohort, fold, max_patches=cfg.data.max_patches, seed=seed_for(cfg.cv.seed, "patches", index),
        n_bins=cfg.data.n_bins, log1p=cfg.data.log1p, use_genes=use_genes, cache=cache,
        block_cells=cfg.data.block_cells,
    )
    weights = None
    if cohort.task == "classification":
        labels = [int(s.class_index) for s in data.train.slides]
        weights = class_weights_from_labels(labels, len(cohort.class_names))
    d_in, patch, size10, encoder = _patch_info(cohort, fold.train)
    return FoldSetup(cohort, index, data, cfg, d_in, patch, size10, encoder, weights)


def model_config(kind: str, setup: FoldSetup, *, cgc: bool = True, dev_weight: float | None = None,
                 subspace_split: bool = True, spatial_context: float | None = None) -> dict[str, Any]:
    """The architecture dict of ``kind`` for this fold (n_outputs, widths, genes); the
    teacher's DEV weight defaults to the run's ``[teacher] dev_weight``."""
    m = setup.cfg.model
    common = {"kind": kind, "task": setup.task, "n_outputs": setup.n_outputs, "d_in": setup.d_in, "d": m.d,
              "magnifications": tuple(setup.cohort.magnifications), "combine": m.combine}
    norm = setup.data.normaliser
    genes = {} if norm is None else {"n_tumor_genes": len(norm.groups_["tumor"]), "n_tme_genes": len(norm.groups_["tme"])}
    match kind:
        case "teacher":
            return {**common, **genes, "dropout": m.dropout, "n_heads": m.n_heads, "cgc": cgc,
                    "cgc_granularity": setup.cfg.teacher.cgc_granularity,
                    "dev_weight": setup.cfg.teacher.dev_weight if dev_weight is None else dev_weight,
                    "patch_size_10x_level0": setup.patch_size_10x_level0,
                    "subspace_split": subspace_split, "dev_form": setup.cfg.teacher.dev_form,
                    "spatial_context": setup.cfg.teacher.spatial_context if spatial_context is None else spatial_context,
                    "gene_residual": setup.cfg.teacher.gene_residual, "gene_dropout": setup.cfg.teacher.gene_dropout,
                    "gene_gate": setup.cfg.teacher.gene_gate,
                    "slide_head": setup.cfg.teacher.slide_aux_weight > 0, "probes": setup.cfg.teacher.probes}
        case "student":
            return {**common, "k": m.k, "knn": m.knn, "n_heads": m.n_heads, "dropout": m.dropout,
                    "assignment": m.ita_assignment, "temperature": m.ita_temperature,
                    "membership_scale": m.ita_membership_scale, "candidates": m.ita_candidates,
                    "n_anchors": m.ita_anchors, "probes": setup.cfg.student.probes,
                    "probe_pooling": setup.cfg.student.probe_pooling,
                    "probe_context": setup.cfg.student.probe_context,
                    "patch_size_10x_level0": setup.patch_size_10x_level0}
        case "abmil":
            return {**common, "dropout": m.dropout, "combine": setup.cfg.baselines.combine}
        case "late_fusion" | "genes_only":
            return {**common, **genes, "dropout": m.dropout, "combine": setup.cfg.baselines.combine}
    raise ValueError(kind)


class SupervisedObjective:
    """Task loss on the combined and per-magnification logits, + DEV and CGC for the teacher."""

    def __init__(self, model: nn.Module, *, task: str, class_weights: Tensor | None,
                 dev_weight: float = 0.0, cgc: bool = False, patch_size_10x_level0: float = 448.0,
                 dev_scale: float = 1.0, dev_form: str = "agreement", dev_warmup: int = 0,
                 slide_aux_weight: float = 0.0, cgc_granularity: str = "block") -> None:
        self.task = task
        self.own = own_outputs(model)
        self.slide_aux_weight = slide_aux_weight
        self.class_weights = class_weights
        mags = set(model.config.magnifications)
        self.dev_weight = dev_weight if {"10x", "20x"} <= mags else 0.0
        self.patch_size_10x_level0, self.dev_scale, self.dev_form = patch_size_10x_level0, dev_scale, dev_form
        self.dev_warmup, self.epoch = dev_warmup, 0
        heads = getattr(model, "fusion_heads", None)
        self.cgc = (CGCStep(heads, task=task, enabled=cgc and heads is not None, granularity=cgc_granularity)
                    if heads is not None else None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _task(self, logits: Tensor, batch: Batch) -> Tensor:
        return task_loss(logits, batch.target, task=self.task, events=batch.event, class_weights=self.class_weights)

    def train_loss(self, net: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        out = net(batch.bags, **batch.model_kwargs(), **self.own)
        combined = self._task(out.logits, batch)
        per_mag = torch.stack([self._task(lg, batch) for lg in out.per_magnification_logits.values()]).mean()
        loss = combined + per_mag
        parts = {"task": float(combined.detach()), "task_per_mag": float(per_mag.detach())}
        slide_logits = [v for k, v in out.extras.items() if k.startswith(SLIDE_LOGITS)]
        if self.slide_aux_weight > 0 and slide_logits:
            slide = torch.stack([self._task(lg, batch) for lg in slide_logits]).mean()
            loss = loss + self.slide_aux_weight * slide
            parts["task_slide"] = float(slide.detach())
        if self.dev_weight > 0 and len(batch) >= 2 and self.epoch >= self.dev_warmup:
            dev = dev_loss_from_output(out, batch.coords, batch.masks,
                                       patch_size_10x_level0=self.patch_size_10x_level0,
                                       footprints=batch.footprints, scale=self.dev_scale,
                                       form=self.dev_form)
            loss = loss + self.dev_weight * dev
            parts["dev"] = float(dev.detach())
        if self.cgc is not None:
            self.cgc.observe(out.features, batch.target)
        return loss, parts

    def after_backward(self) -> dict[str, float]:
        if self.cgc is None or not self.cgc.enabled:
            return {}
        reports = self.cgc.apply()
        return {"cgc_projected": float(np.mean([r.projected is not None for r in reports.values()]))} if reports else {}


def train_supervised_fold(
    *, kind: str, name: str, setup: FoldSetup, out_dir: Path, cgc: bool | None = None,
    dev_weight: float | None = None, subspace_split: bool = True, spatial_context: float | None = None,
    ctx: DistContext = SINGLE,
) -> FoldOutcome:
    """Train the teacher (stage I) or a baseline on one fold; files under ``out_dir``."""
    cfg = setup.cfg
    if kind == "teacher":
        cgc = cfg.teacher.cgc if cgc is None else cgc
        dev_weight = cfg.teacher.dev_weight if dev_weight is None else dev_weight
        section = cfg.teacher
        settings = LoopSettings(section.epochs, section.lr, section.weight_decay, section.patience,
                                cfg.data.batch_size, cfg.cv.select_on, cfg.cv.seed, cfg.cv.weight_ema)
    else:
        cgc, dev_weight = False, 0.0
        b = cfg.baselines
        settings = LoopSettings(b.epochs, b.lr, cfg.teacher.weight_decay, b.patience, cfg.data.batch_size,
                                cfg.cv.select_on, cfg.cv.seed, cfg.cv.weight_ema)
    torch.manual_seed(seed_for(cfg.cv.seed, name, setup.index, "init"))
    model = build_model(model_config(kind, setup, cgc=cgc, dev_weight=dev_weight, subspace_split=subspace_split,
                                     spatial_context=spatial_context))
    extras = setup.extras(name)
    if not (out_dir / "metrics.json").exists():
        chosen = fit_frozen_paths(model, setup.data, task=setup.task, n_outputs=setup.n_outputs,
                                  select_on=cfg.cv.select_on, seed=seed_for(cfg.cv.seed, name, setup.index, "probes"))
        if chosen is not None:
            extras["probes"] = chosen
    objective = SupervisedObjective(model, task=setup.task, class_weights=setup.class_weights,
                                    dev_weight=dev_weight, cgc=cgc,
                                    patch_size_10x_level0=setup.patch_size_10x_level0,
                                    dev_scale=getattr(model.config, "dev_scale", 1.0),
                                    dev_form=getattr(model.config, "dev_form", "agreement"),
                                    dev_warmup=cfg.teacher.dev_warmup if kind == "teacher" else 0,
                                    slide_aux_weight=cfg.teacher.slide_aux_weight if kind == "teacher" else 0.0,
                                    cgc_granularity=getattr(model.config, "cgc_granularity", "block"))
    return train_fold(model=model, objective=objective, data=setup.data, settings=settings, fold_dir=out_dir,
                      name=name, fold=setup.index, extras=extras, class_weights=setup.class_weights,
                      class_names=setup.cohort.class_names, ctx=ctx)
