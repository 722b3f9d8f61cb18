"""Fit the student's frozen map scorers (model/probes.py ``MapScorers``) to the teacher's maps.

Per magnification and subspace, a linear score s(x) = z(x) . v over standardised patch
features (mixed with their lattice neighbourhood, ``MapScorers.mixed``) whose softmax over a
slide's patches matches the teacher's map on that slide: minimise the mean over training slides of KL(teacher map || softmax(s)) + penalty |v|^2,
a smooth convex problem solved by L-BFGS, the penalty chosen on the validation slides' KL.
The teacher reads the genes; the scores do not, so they carry its gene-guided localisation
to slides without expression. Each slide contributes at most ``MAP_FIT_PATCHES`` patches,
fewer when the cohort is large (``MAP_FIT_ROWS`` per magnification in all; drawn without
replacement, the teacher's map renormalised over them): the fit's memory is bounded whatever
the bag sizes and slide counts (131k rows x 1024 features = 0.5 GB per magnification), and a
region of a few percent of a bag keeps its share.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from napari_dismm.model.outputs import SUBSPACES
from training.dataset import SlideDataset, collate_bags

#: patches per slide and magnification the fit reads at most
MAP_FIT_PATCHES = 2048
#: rows per magnification the fit holds at most over all slides (a large cohort gives each
#: slide fewer, never below ``MAP_FIT_MIN_PATCHES``)
MAP_FIT_ROWS = 131072
MAP_FIT_MIN_PATCHES = 64
#: the penalties validation chooses from (on standardised features)
MAP_PENALTIES: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
#: L-BFGS iterations per penalty
MAP_FIT_ITERATIONS = 200


@torch.no_grad()
def scorer_features(model: torch.nn.Module, bag, mag: str) -> Tensor:
    """(N, D) what ``model``'s map scorers read of one slide at ``mag``: its whole bag mixed
    with the lattice neighbourhood (``MapScorers.mixed``), as the forward pass mixes it."""
    x = bag.bags[mag].float()[None]
    footprint = bag.footprints.get(mag)
    footprints = {mag: torch.tensor([float("nan") if footprint is None else float(footprint)], dtype=torch.float64)}
    steps = model.footprint_steps({mag: x}, footprints)[mag]
    return model.map_scorers.mixed(x, bag.coords[mag][None], None, steps)[0]


def teacher_map_samples(teacher: torch.nn.Module, model: torch.nn.Module, dataset: SlideDataset,
                        magnifications: list[str], *, rng: np.random.Generator, device: torch.device | str = "cpu",
                        ) -> dict[str, list[tuple[Tensor, Tensor]]]:
    """Per magnification, per slide: (n, D) sampled features as ``model``'s scorers read them
    and (n, 2) the teacher's tumor and TME maps on them, each column renormalised to sum to 1
    (slides whose map has no mass on the sample are left out)."""
    per_slide = min(MAP_FIT_PATCHES, max(MAP_FIT_MIN_PATCHES, MAP_FIT_ROWS // max(len(dataset), 1)))
    samples: dict[str, list[tuple[Tensor, Tensor]]] = {m: [] for m in magnifications}
    was_training = teacher.training
    teacher.eval()
    for i in range(len(dataset)):
        bag = dataset[i]  # read once: the teacher's maps and the sampled features come from it
        batch = collate_bags([bag]).to(device)
        with torch.no_grad():
            attention = teacher(batch.bags, **batch.model_kwargs()).attention
        for mag in magnifications:
            if mag not in bag.bags or mag not in attention:
                continue
            n = bag.bags[mag].shape[0]
            if n == 0:
                continue
            real = batch.masks[mag][0].bool()
            maps = {u: attention[mag][u][0][real].float().cpu().numpy() for u in SUBSPACES}
            x = scorer_features(model, bag, mag)
            keep = np.sort(rng.choice(n, size=min(n, per_slide), replace=False))
            target = np.stack([np.asarray(maps[u], dtype=np.float64)[keep] for u in SUBSPACES], axis=1)
            mass = target.sum(axis=0)
            if not np.all(mass > 0) or not np.all(np.isfinite(target)):
                continue
            samples[mag].append((x[torch.from_numpy(keep)], torch.from_numpy(target / mass).float()))
    teacher.train(was_training)
    return samples


def _mean_kl(v: Tensor, data: list[tuple[Tensor, Tensor]], column: int) -> Tensor:
    total = v.new_zeros(())
    for z, target in data:
        t = target[:, column]
        log_q = torch.log_softmax(z @ v, dim=0)
        total = total + (t * (t.clamp_min(1e-12).log() - log_q)).sum()
    return total / max(len(data), 1)


def fit_score(train: list[tuple[Tensor, Tensor]], val: list[tuple[Tensor, Tensor]], column: int,
              ) -> tuple[Tensor, dict[str, float]]:
    """One subspace's weight vector over standardised features; the penalty is picked on the
    validation KL (on the training KL when there is no validation slide)."""
    best: tuple[float, Tensor, float] | None = None
    width = train[0][0].shape[1]
    for penalty in MAP_PENALTIES:
        v = torch.zeros(width, requires_grad=True)
        optimizer = torch.optim.LBFGS([v], max_iter=MAP_FIT_ITERATIONS, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = _mean_kl(v, train, column) + penalty * (v ** 2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            judged = float(_mean_kl(v, val or train, column))
        if math.isfinite(judged) and (best is None or judged < best[0]):
            best = (judged, v.detach().clone(), penalty)
    if best is None:
        return torch.zeros(width), {"penalty": float("nan"), "val_kl": float("nan")}
    return best[1], {"penalty": best[2], "val_kl": round(best[0], 6)}


def fit_map_scorers(model: torch.nn.Module, teacher: torch.nn.Module, train: SlideDataset, val: SlideDataset, *,
                    seed: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Fit ``model.map_scorers`` on ``train`` (whole bags) to ``teacher``'s maps, penalties
    chosen on ``val``; returns what validation chose per magnification and subspace."""
    mags = list(model.config.magnifications)
    rng = np.random.default_rng(seed)
    train_samples = teacher_map_samples(teacher, model, train, mags, rng=rng, device=device)
    val_samples = teacher_map_samples(teacher, model, val, mags, rng=rng, device=device)
    d_in = model.map_scorers.mean.shape[1]
    mean, scale = np.zeros((len(mags), d_in)), np.ones((len(mags), d_in))
    weight = np.zeros((len(mags), 2, d_in))
    chosen: dict[str, Any] = {}
    with torch.enable_grad():
        for i, mag in enumerate(mags):
            if not train_samples[mag]:
                chosen[mag] = {"skipped": "no training slide with patches at this magnification"}
                continue  # zero weights: the scores pool the mean
            stacked = torch.cat([x for x, _ in train_samples[mag]])
            mu, sd = stacked.mean(0), stacked.std(0)
            sd = torch.where(sd < 1e-8, torch.ones_like(sd), sd)
            standard = lambda part: [((x - mu) / sd, t) for x, t in part]  # noqa: E731
            tr, va = standard(train_samples[mag]), standard(val_samples[mag])
            chosen[mag] = {}
            for column, u in enumerate(SUBSPACES):
                v, chosen[mag][u] = fit_score(tr, va, column)
                weight[i, column] = v.numpy()
            mean[i], scale[i] = mu.numpy(), sd.numpy()
    model.map_scorers.set_fit(mean=mean, scale=scale, weight=weight)
    return chosen
