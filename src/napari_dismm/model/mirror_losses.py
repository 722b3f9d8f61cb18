"""MIRROR's pretraining losses (METHOD.md section 2), as plain functions of tensors.

Kept apart from the modules so each can be checked against a direct computation:

- alignment: symmetric CLIP cross-entropy between L2-normalised slide and RNA embeddings,
  scaled by a learnable temperature (the caller clamps the scale, reference 100);
- retention: mean squared error on the masked positions only, against a *detached*
  target (Decision: stop-gradient targets, so the encoder cannot lower the loss by moving
  its own target);
- style: KL of each diagonal Gaussian posterior to N(0, I);
- cluster: symmetric KL between the two modalities' prototype assignments, plus a balance
  term, log K - H(mean assignment) + mean H(assignment), that is 0 only when decided
  assignments use all prototypes evenly (Decision: without it the assignment may
  collapse onto one prototype, or onto one flat distribution shared by every sample).
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
    "gaussian_kl",
    "mean_assignment_entropy",
    "retention_loss",
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
