"""MIRROR's pretraining losses (METHOD.md section 2), as plain functions of tensors.

Kept apart from the modules so each can be checked against a direct computation:

- alignment: symmetric CLIP cross-entropy between L2-normalised slide and RNA embeddings,
  scaled by a learnable temperature (the caller clamps the scale, reference 100);
- retention: mean squared error on the masked positions only, against a *detached*
  target (Decision: stop-gradient targets, so the encoder cannot lower the loss by moving
  its own target);
- style: KL of each diagonal Gaussian posterior to N(0, I);
- cluster: symmetric KL between the two modalities' prototype assignments, plus a balance
  term (Decision: without it the assignment may collapse onto one prototype): each
  modality's prediction is trained towards the *other* modality's Sinkhorn-Knopp labels
  (:func:`balanced_labels`: the argmax of :func:`sinkhorn_targets`, without gradient),
  which spread the batch over the prototypes by construction (the equal-partition
  constraint removes what all samples share), so a collapsed prediction always pays.
  :func:`balance_loss` (mutual-information form) measures balance, e.g. in tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from napari_dismm.errors import DataError

__all__ = [
    "alignment_loss",
    "balance_loss",
    "balanced_labels",
    "gaussian_kl",
    "mean_assignment_entropy",
    "retention_loss",
    "sinkhorn_targets",
    "swapped_prediction_loss",
    "symmetric_kl",
]


def alignment_loss(slide: Tensor, rna: Tensor, *, scale: Tensor | float) -> Tensor:
    """CLIP loss of (B, d) embeddings (normalised here); pair i is sample i of both.

    Mean of the slide->RNA and RNA->slide cross-entropies of ``scale * cos`` logits."""
    if slide.shape != rna.shape or slide.ndim != 2:
        raise DataError(f"alignment needs two (B, d) embeddings of one shape, got {tuple(slide.shape)} and {tuple(rna.shape)}")
    if slide.shape[0] < 2:
        raise DataError("alignment needs a batch of at least 2 pairs (the other pairs are the negatives)")
    logits = scale * F.normalize(slide, dim=-1) @ F.normalize(rna, dim=-1).T
    target = torch.arange(slide.shape[0], device=slide.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def retention_loss(prediction: Tensor, target: Tensor, masked: Tensor) -> Tensor:
    """MSE over the ``masked`` rows (bool, prediction's leading shape); target detached.

    Returns 0 (with a graph) when nothing is masked, so a tiny bag never breaks a step."""
    if prediction.shape != target.shape or masked.shape != prediction.shape[: masked.ndim]:
        raise DataError(f"retention: prediction {tuple(prediction.shape)}, target {tuple(target.shape)} "
                        f"and mask {tuple(masked.shape)} disagree")
    if not masked.any():
        return prediction.sum() * 0.0
    return F.mse_loss(prediction[masked], target.detach()[masked])


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over the latent, mean over the batch."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1).mean()


def symmetric_kl(p: Tensor, q: Tensor, *, eps: float = 1e-8) -> Tensor:
    """0.5 (KL(p || q) + KL(q || p)) of (B, K) distributions, mean over the batch."""
    log_p, log_q = (p + eps).log(), (q + eps).log()
    return 0.5 * ((p * (log_p - log_q)).sum(-1) + (q * (log_q - log_p)).sum(-1)).mean()


def mean_assignment_entropy(p: Tensor, *, eps: float = 1e-8) -> Tensor:
    """Entropy of the batch-mean assignment (nats): log K when even, 0 when collapsed."""
    mean = p.mean(dim=0)
    return -(mean * (mean + eps).log()).sum()


def balance_loss(p: Tensor, *, eps: float = 1e-8) -> Tensor:
    """log K - H(mean assignment) + mean H(assignment) >= 0 (mutual-information form).

    The first part alone is fooled by soft assignments that are the same for every sample
    (high entropy of the mean, yet one argmax for all); the per-sample entropy term asks
    each assignment to be decided. 0 only for decided assignments that use all prototypes
    evenly; log K for a batch on one prototype or all on one flat distribution."""
    per_sample = -(p * (p + eps).log()).sum(dim=-1).mean()
    return math.log(p.shape[-1]) - mean_assignment_entropy(p) + per_sample


@torch.no_grad()
def sinkhorn_targets(scores: Tensor, *, epsilon: float = 0.05, n_iters: int = 3) -> Tensor:
    """Balanced soft targets (B, K) for (B, K) prototype scores, without gradient.

    Sinkhorn-Knopp on Q = exp(scores / epsilon): alternately rescale so that every
    prototype receives 1/K of the batch's mass and every sample carries 1/B (the
    equal-partition constraint), then return each sample's row normalised to sum to 1.
    Whatever the scores, the targets cannot put the whole batch on one prototype: with
    B >= K each prototype gets about B/K samples' worth of mass, with B < K the samples
    spread over disjoint groups of prototypes. Computed in log space (scores of any scale).
    The last step normalises the samples, so rows sum to 1 exactly; the prototype
    marginals are balanced up to the iterations' tolerance."""
    if scores.ndim != 2:
        raise DataError(f"sinkhorn_targets needs (B, K) scores, got {tuple(scores.shape)}")
    if n_iters < 1 or epsilon <= 0:
        raise DataError("sinkhorn_targets needs n_iters >= 1 and epsilon > 0")
    bsz, k = scores.shape
    log_q = scores.detach().double() / epsilon
    log_q = log_q - log_q.max()
    for _ in range(n_iters):
        log_q = log_q - log_q.logsumexp(dim=0, keepdim=True) - math.log(k)    # prototypes: 1/K each
        log_q = log_q - log_q.logsumexp(dim=1, keepdim=True) - math.log(bsz)  # samples: 1/B each
    return (log_q + math.log(bsz)).exp().to(scores.dtype)


def swapped_prediction_loss(logits_a: Tensor, logits_b: Tensor, target_a: Tensor, target_b: Tensor) -> Tensor:
    """0.5 (KL(target_b || softmax(logits_a)) + KL(target_a || softmax(logits_b))), batch mean.

    SwAV's swapped prediction between two views, here the two modalities: each predicts the
    balanced target of the other (targets carry no gradient). In KL form, so it is 0 when
    the predictions equal the targets."""
    def kl(target: Tensor, logits: Tensor) -> Tensor:
        target = target.detach()
        return (target * (target.clamp_min(1e-12).log() - logits.log_softmax(dim=-1))).sum(-1).mean()

    return 0.5 * (kl(target_b, logits_a) + kl(target_a, logits_b))


@torch.no_grad()
def balanced_labels(scores: Tensor, *, epsilon: float = 0.05, n_iters: int = 3) -> Tensor:
    """One-hot (B, K) labels: each sample's argmax of the Sinkhorn plan (SeLa's self-labels).

    Rounded because soft targets of near-equal scores are near-uniform, and one flat
    assignment shared by every sample would meet them at zero loss. The plan's prototype
    normalisation removes what every sample shares, so near-identical samples still get
    spread labels (the argmax of the raw scores would give them all the same one)."""
    plan = sinkhorn_targets(scores, epsilon=epsilon, n_iters=n_iters)
    return F.one_hot(plan.argmax(dim=1), scores.shape[1]).to(scores.dtype)
