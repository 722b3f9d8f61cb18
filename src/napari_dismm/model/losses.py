"""Training losses: task losses, the DEV consistency loss and the distillation loss.

Survival is discrete time (Zadeh & Schmid 2020, as in MCAT/PORPOISE): with hazards
h_k = sigmoid(logit_k) and S_k = prod_{j<=k}(1 - h_j), a patient who died in bin y adds
-log S_{y-1} - log h_y, a patient censored in bin y adds -log S_y (survived through y).
``alpha`` optionally up-weights the uncensored term: (1 - alpha) * L + alpha * L_uncensored
(alpha = 0 gives the plain likelihood; the MIL-survival literature uses 0-0.4).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from napari_dismm.errors import DataError
from napari_dismm.model.grid import grid_index_20x_to_10x, pool_onto_10x
from napari_dismm.model.heads import check_task
from napari_dismm.model.inputs import bag_steps
from napari_dismm.model.outputs import SUBSPACES

# --- task losses -------------------------------------------------------------------


def class_weights_from_labels(labels: Sequence[int] | Tensor, n_classes: int) -> Tensor:
    """Inverse-frequency class weights (mean 1 over the classes present), so rare classes
    count as much as common ones. Absent classes get weight 0."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=n_classes).double()
    if counts.numel() > n_classes:
        raise DataError(f"labels outside [0, {n_classes}) in class_weights_from_labels")
    present = counts > 0
    weights = torch.where(present, counts.sum() / (present.sum() * counts.clamp(min=1)), 0.0)
    return weights.float()


def classification_loss(logits: Tensor, target: Tensor, *, class_weights: Tensor | None = None) -> Tensor:
    """Class-weighted cross-entropy (weighted mean over the batch)."""
    weight = None if class_weights is None else class_weights.to(logits)
    return F.cross_entropy(logits, target.long(), weight=weight)


def survival_nll(logits: Tensor, bins: Tensor, events: Tensor, *, alpha: float = 0.0) -> Tensor:
    """Discrete-time survival NLL (mean over the batch); see the module docstring."""
    bins = bins.long().view(-1, 1)
    events = events.to(logits.dtype).view(-1)
    log_h = F.logsigmoid(logits)  # log h_k
    log_1mh = F.logsigmoid(-logits)  # log (1 - h_k)
    log_s = torch.cumsum(log_1mh, dim=-1)  # log S_k
    log_s_pad = F.pad(log_s, (1, 0))  # log S_{k-1}, with S_{-1} = 1
    before = log_s_pad.gather(1, bins).view(-1)  # log S_{y-1}
    at = log_h.gather(1, bins).view(-1)  # log h_y
    through = log_s.gather(1, bins).view(-1)  # log S_y
    uncensored = -events * (before + at)
    censored = -(1.0 - events) * through
    return ((1.0 - alpha) * (uncensored + censored) + alpha * uncensored).mean()


def task_loss(
    logits: Tensor,
    target: Tensor,
    *,
    task: str,
    events: Tensor | None = None,
    class_weights: Tensor | None = None,
    alpha: float = 0.0,
) -> Tensor:
    """Dispatch on the task: ``target`` is the class, or the time bin (with ``events``)."""
    if check_task(task) == "classification":
        return classification_loss(logits, target, class_weights=class_weights)
    if events is None:
        raise DataError("survival loss needs events (1 = event observed, 0 = censored)")
    return survival_nll(logits, target, events, alpha=alpha)


def survival_bins_from_times(times: Sequence[float], events: Sequence[int], n_bins: int = 4) -> np.ndarray:
    """Bin edges (n_bins + 1,): quantiles of the *uncensored* times of the training fold,
    outer edges 0 and inf. Fit on the training fold only and store with the model."""
    times_a, events_a = np.asarray(times, dtype=float), np.asarray(events)
    if times_a.shape != events_a.shape or times_a.ndim != 1:
        raise DataError("times and events must be 1-D of the same length")
    observed = times_a[events_a.astype(bool)]
    if observed.size == 0:
        raise DataError("no uncensored time to place survival bin edges")
    if n_bins < 1:
        raise DataError(f"n_bins must be >= 1, got {n_bins}")
    inner = np.quantile(observed, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.concatenate([[0.0], inner, [np.inf]])


def time_to_bin(times: Sequence[float] | np.ndarray, edges: Sequence[float] | np.ndarray) -> np.ndarray:
    """Bin index k with edges[k] <= t < edges[k+1] (int64, in [0, n_bins))."""
    times_a, edges_a = np.asarray(times, dtype=float), np.asarray(edges, dtype=float)
    if np.any(times_a < 0) or np.any(~np.isfinite(times_a)):
        raise DataError("survival times must be finite and >= 0")
    n_bins = len(edges_a) - 1
    return np.clip(np.searchsorted(edges_a, times_a, side="right") - 1, 0, n_bins - 1).astype(np.int64)


# --- DEV: inter-magnification consistency -----------------------------------------
#
# DEV asks that every sample be *equally* consistent across magnifications. Three forms:
#
# - "reference" (the paper): S = A10 A20^T over the batch, rows normalised to unit L2 norm,
#   agreement_i = S_ii, loss = scale * Var(agreement). Its off-diagonal S_ij multiplies
#   slide i's map by *another slide's* map position by position; with bags of different
#   sizes and layouts those positions are unrelated places, so S_ii / |S_i| depends on how
#   two slides' patch lists happen to overlap: on the planted cohort, maps identical at 10x
#   and 20x cost *more* (about 33 per subspace) than uniform maps (27).
# - "per_slide": agreement_i = Pearson correlation of A10_i and the pooled A20_i
#   over the slide's own 10x cells (the diagonal of S built from centred unit-norm maps,
#   without the cross-slide terms), and only the slides *below* the batch's mean agreement
#   (held fixed) are charged: scale * sum_i relu(mean - r_i)^2 / (B - 1). A variance pulls
#   the most consistent slides down as hard as it pulls the least consistent up; at the
#   start of training every agreement is noise around 0, so a variance holds them all there.
# - "agreement" (default): the same per-slide correlation r_i, every slide charged for its
#   distance from perfect agreement: scale * mean_i (1 - r_i)^2. It no longer asks for
#   *equal* consistency, only for consistency; at the optimum (every slide's maps agree)
#   the three forms coincide.
#
# Why a warm-up (training/config.py ``dev_warmup``): at initialisation the maps carry no
# tissue signal, and a correlation is scale-free (its gradient grows as the maps flatten):
# per_slide DEV at weight 1e-2 has 5.5x the task's gradient norm on a fresh teacher
# (measured on a planted batch). With independent patch noise at 10x and 20x, the quickest
# way to raise agreement from there is to fit that noise slide by slide. Measured on the planted cohort
# (teacher, held-out folds, tumor / TME attention AUROC on their regions): no DEV 0.81 /
# 0.79; DEV from the first step, per_slide at weight 1e-3: 0.65 / 0.70, at 1: 0.44 / 0.52
# (uncentred cosine instead: 0.70 / 0.70); DEV entering after 5 epochs of task loss: weight
# 1e-3 0.87 / 0.86, 1e-2 0.89 / 0.87, 1e-1 0.88 / 0.87, 1 0.88 / 0.87; on a second cohort
# seed, no DEV 0.79 / 0.81, 1e-2 after 5 epochs 0.86 / 0.87. The one-sided charge matters
# too: after the same warm-up, a two-sided variance of the same correlations gives 0.63 /
# 0.61, and the reference form at weight 1 0.50 / 0.62. The agreement form after the warm-
# up, weight chosen on cohort seeds 0 and 1 (1e-4, 3e-4, 1e-3: mean 0.88 / 0.90, 0.88 /
# 0.90, 0.88 / 0.91; per_slide at 1e-2: 0.88 / 0.87), then checked on seed 2 at 3e-4:
# agreement 0.84 / 0.84, per_slide 0.84 / 0.81, no DEV 0.78 / 0.84. Once the task has shaped
# the maps, consistency across magnifications can only come from the tissue both see, and
# DEV sharpens localisation.

DEV_FORMS = ("agreement", "per_slide", "reference")


def _pearson(a: Tensor, b: Tensor, mask: Tensor | None) -> Tensor:
    """Per row, the correlation of a and b over the row's valid cells (0 where undefined)."""
    valid = torch.ones_like(a, dtype=torch.bool) if mask is None else mask.bool()
    w = valid.to(a.dtype)
    n = w.sum(dim=1, keepdim=True).clamp(min=1.0)
    ac = (a - (a * w).sum(1, keepdim=True) / n) * w
    bc = (b - (b * w).sum(1, keepdim=True) / n) * w
    return F.cosine_similarity(ac, bc, dim=1, eps=1e-12)


def dev_term(a10: Tensor, pooled20: Tensor, *, scale: float = 1.0, form: str = "agreement",
             mask: Tensor | None = None) -> Tensor:
    """One subspace's DEV (see above); ``mask`` (B, N10) marks each sample's real 10x
    cells. Zero when B < 2, in every form (METHOD.md: DEV needs a batch of two or more)."""
    if form not in DEV_FORMS:
        raise ValueError(f"DEV form must be one of {DEV_FORMS}, got {form!r}")
    if a10.shape[0] < 2:
        return a10.sum() * 0.0
    if form == "agreement":
        return scale * (1.0 - _pearson(a10, pooled20, mask)).square().mean()
    if form == "per_slide":
        agreement = _pearson(a10, pooled20, mask)
        shortfall = torch.relu(agreement.mean().detach() - agreement)
        return scale * shortfall.square().sum() / (agreement.shape[0] - 1)
    sim = a10 @ pooled20.T
    sim = sim / sim.norm(dim=1, keepdim=True).clamp(min=torch.finfo(sim.dtype).tiny)
    return scale * torch.diagonal(sim).var(unbiased=True)


def dev_loss(
    att10: dict[str, Tensor],
    att20: dict[str, Tensor],
    coords10: Tensor,
    coords20: Tensor,
    masks10: Tensor | None,
    masks20: Tensor | None,
    *,
    patch_size_10x_level0: float | Tensor = 448.0,
    patch_size_20x_level0: float | Tensor | None = None,
    scale: float = 1.0,
    index: Tensor | None = None,
    form: str = "agreement",
) -> Tensor:
    """L_DEV = (L_T + L_E) / 2 over the batch (see ``dev_term``; the mean of the two
    subspaces, so the agreement form lies in [0, 4] per slide whatever the bag size).

    ``att10[u]`` (B, N10) and ``att20[u]`` (B, N20) are the per-patch attentions of subspace
    u; each 20x weight is added to the 10x patch containing its centre, so sample i's two
    vectors live in its own N10_i space; samples are zero-padded to the batch's N10 so the
    off-diagonal S_ij (needed by the row normalisation) is defined. Patch sizes: one number
    or (B,) each bag's own footprint (``grid_index_20x_to_10x``). ``index`` may pass a
    precomputed ``grid_index_20x_to_10x`` (it depends only on the coordinates)."""
    if index is None:
        index = grid_index_20x_to_10x(
            coords10, coords20, masks10, masks20, patch_size_10x_level0=patch_size_10x_level0,
            patch_size_20x_level0=patch_size_20x_level0,
        )
    terms = []
    for u in SUBSPACES:
        a10 = att10[u] if masks10 is None else att10[u] * masks10.to(att10[u].dtype)
        pooled = pool_onto_10x(att20[u], index, a10.shape[1])
        terms.append(dev_term(a10, pooled, scale=scale, form=form, mask=masks10))
    return torch.stack(terms).mean()


def dev_loss_from_output(
    output,
    coords: dict[str, Tensor],
    masks: dict[str, Tensor] | None,
    *,
    patch_size_10x_level0: float = 448.0,
    footprints: dict[str, Tensor] | None = None,
    scale: float = 1.0,
    index: Tensor | None = None,
    form: str = "agreement",
) -> Tensor:
    """``dev_loss`` on a teacher ModelOutput (needs both "10x" and "20x"). ``footprints``
    (mag -> (B,)) gives each bag's own patch sides (``Batch.footprints``); where absent
    or NaN, ``patch_size_10x_level0`` (and half of it at 20x) stands in."""
    missing = [m for m in ("10x", "20x") if m not in output.attention or m not in coords]
    if missing:
        raise DataError(f"DEV needs attention and coords at 10x and 20x; missing {missing}")
    masks = masks or {}
    batch = coords["10x"].shape[0]
    size10 = bag_steps(footprints, "10x", batch=batch, default=patch_size_10x_level0)
    size20 = bag_steps(footprints, "20x", batch=batch, default=float("nan"))
    size20 = torch.where(torch.isnan(size20), size10 / 2, size20)  # a bag's 20x patch: half its 10x one
    return dev_loss(
        output.attention["10x"],
        output.attention["20x"],
        coords["10x"],
        coords["20x"],
        masks.get("10x"),
        masks.get("20x"),
        patch_size_10x_level0=size10,
        patch_size_20x_level0=size20,
        scale=scale,
        index=index,
        form=form,
    )


# --- distillation --------------------------------------------------------------------


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, *, task: str, temperature: float = 2.0) -> Tensor:
    """T^2 * KL(teacher || student) at temperature T (batch mean).

    Classification: softmax over classes. Survival: each bin's hazard is a Bernoulli
    (sigmoid(logit / T)); the KL is summed over bins, since hazards are what the survival
    head means (a softmax over bins would ignore their absolute level)."""
    t = teacher_logits.detach() / temperature
    s = student_logits / temperature
    if check_task(task) == "classification":
        kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    else:
        p_t = torch.sigmoid(t)
        kl = (
            p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))
        ).sum(-1).mean()
    return temperature**2 * kl


def feature_loss(student: dict[str, Tensor], teacher: dict[str, Tensor]) -> Tensor:
    """Per-subspace MSE between layer-normalised (no affine) student and teacher features,
    summed over tumor and TME, so each subspace is matched to its own teacher feature."""
    total = None
    for u in SUBSPACES:
        s, t = student[u], teacher[u].detach()
        term = F.mse_loss(F.layer_norm(s, s.shape[-1:]), F.layer_norm(t, t.shape[-1:]))
        total = term if total is None else total + term
    return total


def attention_loss(student: dict[str, Tensor], teacher: dict[str, Tensor]) -> Tensor:
    """Per-subspace KL(teacher map || student map) over a bag's patches (batch mean),
    summed over tumor and TME.

    Why (a decision beyond the paper's logit and feature terms): the student's maps are
    what the viewer shows, and the teacher's maps are the ones the genes give meaning. The
    feature term only asks the pooled result to match; on features where tissue type is
    not what varies most, the student reached it without its maps falling on the planted
    regions (planted cohort, held-out tumor / TME map AUROC 0.54 / 0.55 where the teacher's
    are 0.90 / 0.91). Asking each student map to put its weight where the teacher's does,
    with the soft ITA memberships (model.ita) so the gradient reaches the clustering,
    brought them to 0.882 / 0.870 (60 epochs; cohort seed 2, used for no choice: 0.846 /
    0.870 against the teacher's 0.841 / 0.838). Either part alone: soft memberships
    0.656 / 0.652, this term with hard merging 0.646 / 0.600 (tests/training/test_planted.py).
    Maps are (B, N) with zeros on padding, each row summing to 1 over the bag; the same
    bags go to both."""
    total = None
    for u in SUBSPACES:
        s, t = student[u], teacher[u].detach()
        log_ratio = torch.log(t.clamp_min(_MAP_FLOOR)) - torch.log(s.clamp_min(_MAP_FLOOR))
        term = (t * log_ratio).sum(dim=-1).mean()
        total = term if total is None else total + term
    return total


_MAP_FLOOR = 1e-8  # a map's weight below which patches count as not attended (log stays finite)


def distillation_loss(
    *,
    task_term: Tensor,
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_features: dict[str, Tensor],
    teacher_features: dict[str, Tensor],
    task: str,
    temperature: float = 2.0,
    lambda_kd: float = 0.01,
    lambda_f: float = 0.01,
    student_attention: dict[str, Tensor] | None = None,
    teacher_attention: dict[str, Tensor] | None = None,
    lambda_att: float = 0.0,
) -> dict[str, Tensor]:
    """Stage-II loss for one magnification: task + lambda_kd * KD + lambda_f * features
    (+ lambda_att * attention, when both maps are given). Returns the parts and their
    ``total`` so the trainer can log each one."""
    kd = kd_loss(student_logits, teacher_logits, task=task, temperature=temperature)
    feat = feature_loss(student_features, teacher_features)
    total = task_term + lambda_kd * kd + lambda_f * feat
    att = task_term.new_zeros(())
    if lambda_att and student_attention is not None and teacher_attention is not None:
        att = attention_loss(student_attention, teacher_attention)
        total = total + lambda_att * att
    return {"total": total, "task": task_term, "kd": kd, "feature": feat, "attention": att}
