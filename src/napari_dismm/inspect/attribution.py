"""Which genes drive each subspace? Integrated gradients through the teacher's gene encoders.

The score of subspace u for a slide is its share of the task output, averaged over the
magnifications: the subspace logit o_u = f_u W_u^T + b/2 of the fusion head
(:meth:`SubspaceFusionHead.subspace_logits`) at the target class (classification) or
summed over the time bins (survival: higher hazard logits = higher risk). A teacher's frozen
probes (model/probes.py) belong to no subspace and are not part of either score.

Attribution of gene g is integrated gradients from the baseline z = 0 (the training
fold's mean expression, since genes are z-scored) to the patient's vector:

    IG_g = z_g * mean over alpha in (0, 1] of d score(alpha z) / d z_g

(midpoint rule). Completeness holds up to the quadrature error: sum_g IG_g is close to
score(z) - score(0), which the tests check. With the knowledge-driven split the tumor
score can only depend on tumor genes; without it (``subspace_split=False``) both scores
read every gene, and the share a subspace takes from the other side's genes shows it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from napari_dismm.errors import ModelConfigError

SUBSPACES = ("tumor", "tme")


def subspace_scores(model: nn.Module, bags: dict[str, Tensor], *, masks: dict[str, Tensor] | None,
                    genes: dict[str, Tensor], target: Tensor | None,
                    coords: dict[str, Tensor] | None = None,
                    footprints: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """{subspace: (B,) score}: the subspace logits at ``target`` (None = survival: summed).
    ``footprints``: each bag's patch side in level-0 px (its neighbours for spatial context)."""
    if getattr(getattr(model, "config", None), "kind", None) != "teacher":
        raise ModelConfigError(f"gene attribution needs a DisMM teacher, got {type(model).__name__}")
    out = model(bags, coords=coords, masks=masks, genes=genes, footprints=footprints)
    scores = {u: 0.0 for u in SUBSPACES}
    for mag, feats in out.features.items():
        o_t, o_e = model.fusion_heads[mag].subspace_logits(feats["tumor"], feats["tme"])
        for u, logits in zip(SUBSPACES, (o_t, o_e)):
            chosen = logits.sum(-1) if target is None else logits.gather(1, target[:, None]).squeeze(1)
            scores[u] = scores[u] + chosen / len(out.features)
    return scores


def integrated_gradients(model: nn.Module, bags: dict[str, Tensor], *, masks: dict[str, Tensor] | None,
                         genes: dict[str, Tensor], target: Tensor | None, steps: int = 16,
                         coords: dict[str, Tensor] | None = None,
                         footprints: dict[str, Tensor] | None = None) -> dict[str, dict[str, Tensor]]:
    """``{subspace: {gene group: (B, G) attribution}}`` of each subspace score (``coords`` and
    ``footprints``: the patch coordinates and each bag's patch side, which a teacher with
    spatial context needs)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    was_training = model.training
    model.eval()
    totals = {u: {g: torch.zeros_like(v) for g, v in genes.items()} for u in SUBSPACES}
    try:
        for k in range(steps):
            alpha = (k + 0.5) / steps
            scaled = {g: (alpha * v).detach().requires_grad_(True) for g, v in genes.items()}
            scores = subspace_scores(model, bags, masks=masks, genes=scaled, target=target, coords=coords,
                                     footprints=footprints)
            for u in SUBSPACES:
                grads = torch.autograd.grad(scores[u].sum(), list(scaled.values()), retain_graph=u != SUBSPACES[-1],
                                            allow_unused=True)
                for g, grad in zip(scaled, grads):
                    if grad is not None:
                        totals[u][g] += grad.detach()
    finally:
        model.train(was_training)
    return {u: {g: genes[g].detach() * totals[u][g] / steps for g in genes} for u in SUBSPACES}


def top_genes(attributions: dict[str, dict[str, np.ndarray]], gene_names: dict[str, Sequence[str]], *,
              k: int = 10) -> dict[str, dict[str, object]]:
    """Per subspace: the ``k`` genes of largest mean |IG| over patients, and the share of
    the subspace's total |IG| that comes from each gene group.

    ``attributions``: {subspace: {group: (n_patients, G) array}}; ``gene_names``: {group: names}."""
    out: dict[str, dict[str, object]] = {}
    for u, per_group in attributions.items():
        rows = []
        totals = {}
        for group, values in per_group.items():
            mean_abs = np.abs(np.asarray(values, dtype=np.float64)).mean(axis=0)
            totals[group] = float(mean_abs.sum())
            rows += [(str(name), group, float(v)) for name, v in zip(gene_names[group], mean_abs)]
        rows.sort(key=lambda r: -r[2])
        whole = sum(totals.values())
        out[u] = {
            "top": [{"gene": g, "group": grp, "mean_abs_ig": v} for g, grp, v in rows[:k]],
            "share_by_group": {grp: (t / whole if whole > 0 else float("nan")) for grp, t in totals.items()},
        }
    return out
