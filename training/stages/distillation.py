"""Stage II: distil the fold's frozen teacher into the WSI-only student.

Per fold: load the teacher selected in stage I (``<run>/teacher/fold_k/best``), frozen in
eval mode; fix the student's cluster -> subspace mapping from it (the mean of the
teacher's layer-normalised f_T and f_E over the training patients, per magnification);
train the student with, per step,
    L = L_task(combined) + mean over m of distillation_loss_m
where distillation_loss_m = L_task(student logits at m) + lambda_kd * T^2 KL(teacher || student)
+ lambda_f * per-subspace feature loss at m + lambda_att * per-subspace attention loss at m
(model.losses.distillation_loss; the attention term, KL of the teacher's tumor / TME map from
the student's, is a decision beyond the paper, documented in model.losses.attention_loss). The teacher
sees the same (subsampled) bags and the genes; the student never sees genes. Every term reads
both models' own logits, without their probes (``[teacher] probes``, ``[student] probes``,
training/probes.py), and so does the validation that selects the epoch; the test reads the
student's prediction, with its probe. Early stopping on the validation split and one test
pass, as for every model (engine.train_fold).

Naming the student's subspaces (``[student] name_by_teacher``): which of the student's two
token clusters the prototype rule calls "tumor" depends on how its token space happened to
line up with the teacher's features, and came out either way per fold and magnification
(data/demo_model/README.md). The teacher's maps carry the meaning (its tumor map is queried
by the tumor genes), so after training, per magnification, the student's maps are compared
with the teacher's on the fold's *training* patients (mean Spearman correlation over slides,
as named and swapped), and the names are swapped where the swapped pairing agrees more
(``Student.swap_subspaces``: every logit unchanged). No planted truth and no held-out
patient is used.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor, nn

from napari_dismm.errors import DataError
from napari_dismm.model.checkpoint import load_model
from napari_dismm.model.losses import distillation_loss, task_loss
from napari_dismm.model.outputs import SUBSPACES
from napari_dismm.model.probes import own_outputs
from napari_dismm.model.registry import build_model
from training.dataset import Batch, SlideDataset, collate_bags
from training.ddp import SINGLE, DistContext
from training.engine import FoldOutcome, LoopSettings, iterate, predict, seed_for, train_fold
from training.probes import fit_frozen_paths, reuse_slide_probe
from training.stages.supervised import FoldSetup, model_config


@torch.no_grad()
def teacher_prototypes(teacher: nn.Module, dataset: SlideDataset, *, batch_size: int = 8,
                       device: torch.device | str = "cpu") -> dict[str, dict[str, Tensor]]:
    """Per magnification, the mean layer-normalised teacher f_T and f_E over ``dataset``
    (whole bags, eval mode): the student's fixed subspace prototypes."""
    sums: dict[str, dict[str, Tensor]] = {}
    count = 0
    for idx in iterate(dataset, batch_size):
        batch = collate_bags([dataset[i] for i in idx]).to(device)
        out = teacher(batch.bags, **batch.model_kwargs())
        for mag, feats in out.features.items():
            per = sums.setdefault(mag, {})
            for u in SUBSPACES:
                f = F.layer_norm(feats[u].float(), feats[u].shape[-1:]).sum(0)
                per[u] = per[u] + f if u in per else f
        count += len(batch)
    if count == 0:
        raise DataError("no training slide to set the student's prototypes from")
    return {mag: {u: v / count for u, v in per.items()} for mag, per in sums.items()}


def teacher_agreement(student: nn.Module, teacher: nn.Module, dataset: SlideDataset, *, batch_size: int = 8,
                      device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Per magnification, the mean over slides of the Spearman correlation between the
    student's and the teacher's maps, paired as named (tumor-tumor, TME-TME) and swapped
    (tumor-TME, TME-tumor); each pairing averages its two subspaces."""
    s_maps = predict(student, dataset, batch_size=batch_size, device=device, attention=True).attention
    t_maps = predict(teacher, dataset, batch_size=batch_size, device=device, attention=True).attention
    pairings = {"as_named": (("tumor", "tumor"), ("tme", "tme")), "swapped": (("tumor", "tme"), ("tme", "tumor"))}
    out: dict[str, dict[str, float]] = {}
    for mag in student.config.magnifications:
        rows: dict[str, list[float]] = {name: [] for name in pairings}
        for s_slide, t_slide in zip(s_maps, t_maps, strict=True):
            if mag not in s_slide or mag not in t_slide or len(s_slide[mag]["tumor"]) < 3:
                continue
            for name, pairs in pairings.items():
                rows[name].append(_mean_finite([_spearman(s_slide[mag][a], t_slide[mag][b]) for a, b in pairs]))
        out[mag] = {name: _mean_finite(values) for name, values in rows.items()}
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation; NaN when either map is constant (it has no ranking)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _mean_finite(values) -> float:
    """Mean of the finite values; NaN if none."""
    finite = [float(v) for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def name_subspaces_by_teacher(student: nn.Module, teacher: nn.Module, dataset: SlideDataset, *,
                              batch_size: int = 8, device: torch.device | str = "cpu"
                              ) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Swap the student's tumor / TME names at the magnifications where the swapped pairing
    agrees more with the teacher (see the module docstring); returns (swapped, agreement)."""
    agreement = teacher_agreement(student, teacher, dataset, batch_size=batch_size, device=device)
    swapped = [mag for mag, a in agreement.items() if a["swapped"] > a["as_named"]]
    for mag in swapped:
        student.swap_subspaces(mag)
    return swapped, agreement


class DistillationObjective:
    """Student loss against a frozen teacher (see the module docstring)."""

    def __init__(self, teacher: nn.Module, *, task: str, class_weights: Tensor | None, temperature: float,
                 lambda_kd: float, lambda_f: float, lambda_att: float = 0.0,
                 own: dict[str, Any] | None = None, select_by: str = "task") -> None:
        self.teacher = teacher.eval()
        self.select_by = select_by
        self._val_teacher: dict[tuple[str, ...], SimpleNamespace] = {}  # frozen: computed once per batch
        self.teacher_own, self.own = own_outputs(teacher), own or {}
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.task, self.class_weights = task, class_weights
        self.temperature, self.lambda_kd, self.lambda_f = temperature, lambda_kd, lambda_f
        self.lambda_att = lambda_att

    def _task(self, logits: Tensor, batch: Batch) -> Tensor:
        return task_loss(logits, batch.target, task=self.task, events=batch.event, class_weights=self.class_weights)

    def _teacher_outputs(self, batch: Batch) -> SimpleNamespace:
        """What the terms read of the frozen teacher: its own logits (without its probes, as the
        student's are), subspace features and maps."""
        with torch.no_grad():
            out = self.teacher(batch.bags, **batch.model_kwargs(), **self.teacher_own)
        return SimpleNamespace(per_magnification_logits=out.per_magnification_logits, features=out.features,
                               attention=out.attention)

    def train_loss(self, net: nn.Module, batch: Batch, *,
                   teacher_out: SimpleNamespace | None = None) -> tuple[Tensor, dict[str, float]]:
        t_out = self._teacher_outputs(batch) if teacher_out is None else teacher_out
        s_out = net(batch.bags, coords=batch.coords, masks=batch.masks, genes=None, footprints=batch.footprints,
                    **self.own)
        combined = self._task(s_out.logits, batch)
        terms = []
        for mag, logits in s_out.per_magnification_logits.items():
            terms.append(distillation_loss(
                task_term=self._task(logits, batch), student_logits=logits,
                teacher_logits=t_out.per_magnification_logits[mag], student_features=s_out.features[mag],
                teacher_features=t_out.features[mag], task=self.task, temperature=self.temperature,
                lambda_kd=self.lambda_kd, lambda_f=self.lambda_f, student_attention=s_out.attention[mag],
                teacher_attention=t_out.attention[mag], lambda_att=self.lambda_att,
            ))
        per_mag = {k: torch.stack([t[k] for t in terms]).mean() for k in ("total", "task", "kd", "feature", "attention")}
        loss = combined + per_mag["total"]
        parts = {"task": float(combined.detach()), "task_per_mag": float(per_mag["task"].detach()), "kd": float(per_mag["kd"].detach()),
                 "feature": float(per_mag["feature"].detach()), "attention": float(per_mag["attention"].detach())}
        return loss, parts

    def after_backward(self) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def validation_loss(self, net: nn.Module, dataset: SlideDataset, *, batch_size: int,
                        device: torch.device | str) -> float | None:
        """The whole stage-II objective on the validation patients (eval mode, whole bags, the
        student's own logits as trained), or None when ``select_by`` is "task" (the engine then
        selects on the task loss alone). The frozen teacher's outputs on each validation batch
        are computed once and kept.

        Why: judged on the task loss of ~10 validation patients, the student's epoch was chosen
        at 11-15 of 60 on the planted `small_region` cohorts, while its maps were still learning
        the teacher's (the attention term fell from 7.8 to 3.1 by epoch 30); the objective
        also asks the maps, features and logits to follow the teacher (README)."""
        if self.select_by != "objective" or len(dataset) == 0:
            return None
        was_training = net.training
        net.eval()
        total = 0.0
        for idx in iterate(dataset, batch_size):
            batch = collate_bags([dataset[i] for i in idx]).to(device)
            key = tuple(batch.slide_ids)
            if key not in self._val_teacher:
                self._val_teacher[key] = self._teacher_outputs(batch)
            loss, _ = self.train_loss(net, batch, teacher_out=self._val_teacher[key])
            total += float(loss) * len(idx)
        net.train(was_training)
        return total / len(dataset)


def train_student_fold(
    *, setup: FoldSetup, teacher_dir: Path, out_dir: Path, name: str = "student", ctx: DistContext = SINGLE
) -> FoldOutcome:
    """Stage II on one fold; ``teacher_dir`` is the fold's saved best teacher."""
    cfg = setup.cfg
    if not (teacher_dir / "model.safetensors").exists():
        raise DataError(f"stage II needs the fold's teacher at {teacher_dir}: train the teacher first")
    teacher, teacher_doc = load_model(teacher_dir, map_location=ctx.device)
    torch.manual_seed(seed_for(cfg.cv.seed, name, setup.index, "init"))
    student = build_model(model_config("student", setup))
    if not (out_dir / "metrics.json").exists():
        protos = teacher_prototypes(teacher, setup.data.train, batch_size=cfg.data.batch_size, device=ctx.device)
        for mag, per in protos.items():
            student.set_subspace_prototypes(per["tumor"], per["tme"], magnification=mag)
    chosen = None
    if not (out_dir / "metrics.json").exists():
        chosen = reuse_slide_probe(student, teacher, teacher_doc.get("probes")) or fit_frozen_paths(
            student, setup.data, task=setup.task, n_outputs=setup.n_outputs, select_on=cfg.cv.select_on,
            seed=seed_for(cfg.cv.seed, name, setup.index, "probes"), teacher=teacher, device=ctx.device)
    s = cfg.student
    settings = LoopSettings(s.epochs, s.lr, s.weight_decay, s.patience, cfg.data.batch_size, cfg.cv.select_on,
                            cfg.cv.seed, cfg.cv.weight_ema)
    objective = DistillationObjective(teacher, task=setup.task, class_weights=setup.class_weights,
                                      temperature=s.temperature, lambda_kd=s.lambda_kd, lambda_f=s.lambda_f,
                                      lambda_att=s.lambda_att, own=own_outputs(student), select_by=s.select_by)
    extras = setup.extras(name)
    if chosen is not None:
        extras["probes"] = chosen
    extras["teacher"] = str(teacher_dir)  # gene lists stay: what the teacher it learnt from read

    def name_by_teacher(model: nn.Module) -> dict[str, Any]:
        swapped, agreement = name_subspaces_by_teacher(model, teacher, setup.data.train,
                                                       batch_size=cfg.data.batch_size, device=ctx.device)
        return {"teacher_naming": {"swapped": swapped, "agreement": agreement}}

    return train_fold(model=student, objective=objective, data=setup.data, settings=settings, fold_dir=out_dir,
                      name=name, fold=setup.index, extras=extras, class_weights=setup.class_weights,
                      class_names=setup.cohort.class_names, ctx=ctx,
                      finalize=name_by_teacher if s.name_by_teacher else None)
