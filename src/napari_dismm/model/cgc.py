"""Confidence-guided gradient coordination (CGC) on a SubspaceFusionHead.

Use, per training step and per fusion head:

    conf = subspace_confidences(head, f_tumor, f_tme, target, task=task)   # before backward
    loss.backward()
    report = coordinate_gradients(head, conf)                              # before step

If the tumor and TME weight-gradient blocks point against each other (cosine < 0), the
block of the LESS confident subspace is projected once onto the normal plane of the more
confident one: g <- g - (g.h / |h|^2) h. Ties go to tumor (TME is projected).

Under DistributedDataParallel the gradients are already averaged over processes when
backward returns; the confidences are sums over the local batch, so we all-reduce (sum)
them. Every rank then takes the same decision on the same gradients, which equals the
single-process result on the concatenated batch (for equal local batch sizes and a
batch-mean loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from napari_dismm.model.heads import SubspaceFusionHead, check_task


@dataclass(frozen=True)
class CGCReport:
    """What CGC did in one step: the cosine between the blocks (before projection), which
    subspace's block was projected (None when the cosine was >= 0 or undefined), and the
    two confidences used for the decision."""

    cosine: float
    projected: str | None
    confidence_tumor: float
    confidence_tme: float


def _distributed(process_group: object | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


@torch.no_grad()
def subspace_confidences(
    head: SubspaceFusionHead,
    f_tumor: Tensor,
    f_tme: Tensor,
    target: Tensor,
    *,
    task: str,
    process_group: object | None = None,
) -> Tensor:
    """(2,) = [s_T, s_E], s_u = sum over the batch of softmax(o_u)[y].

    For survival ``target`` is the discrete time bin and the bin logits are read as a
    categorical (softmax over bins). Summed over processes under torch.distributed."""
    check_task(task)
    o_tumor, o_tme = head.subspace_logits(f_tumor.detach(), f_tme.detach())
    index = target.long().view(-1, 1)
    conf = torch.stack(
        [o.softmax(dim=-1).gather(1, index).sum() for o in (o_tumor, o_tme)]
    ).double()
    if _distributed(process_group):
        dist.all_reduce(conf, op=dist.ReduceOp.SUM, group=process_group)
    return conf


@torch.no_grad()
def coordinate_gradients(head: SubspaceFusionHead, confidences: Tensor) -> CGCReport:
    """Project the less confident block's gradient if the blocks conflict; in place."""
    grad = head.linear.weight.grad
    s_tumor, s_tme = (float(c) for c in confidences)
    if grad is None:
        return CGCReport(float("nan"), None, s_tumor, s_tme)
    d = head.d
    g_tumor, g_tme = grad[:, :d], grad[:, d:]
    # work in float64 so orthogonality holds to round-off of the final cast only
    t, e = g_tumor.reshape(-1).double(), g_tme.reshape(-1).double()
    norms = t.norm() * e.norm()
    if norms == 0:
        return CGCReport(float("nan"), None, s_tumor, s_tme)
    cosine = float(t @ e / norms)
    if cosine >= 0:
        return CGCReport(cosine, None, s_tumor, s_tme)
    if s_tumor >= s_tme:
        projected, block, g, h = "tme", g_tme, e, t
    else:
        projected, block, g, h = "tumor", g_tumor, t, e
    g = g - (g @ h) / (h @ h) * h
    block.copy_(g.view_as(block).to(block.dtype))
    return CGCReport(cosine, projected, s_tumor, s_tme)


class CGCStep:
    """Convenience for models with one SubspaceFusionHead per magnification
    (``model.fusion_heads``; under DDP pass ``ddp.module.fusion_heads``): ``observe``
    before backward, ``apply`` after it. ``enabled=False`` (config ``cgc``) makes both
    no-ops, for ablations."""

    def __init__(
        self,
        heads: dict[str, SubspaceFusionHead],
        *,
        task: str,
        enabled: bool = True,
        process_group: object | None = None,
    ) -> None:
        self.heads = heads
        self.task = check_task(task)
        self.enabled = enabled
        self.process_group = process_group
        self._confidences: dict[str, Tensor] = {}

    def observe(self, features: dict[str, dict[str, Tensor]], target: Tensor) -> None:
        """``features`` = ModelOutput.features (mag -> {"tumor", "tme"})."""
        if not self.enabled:
            return
        self._confidences = {
            mag: subspace_confidences(
                self.heads[mag], f["tumor"], f["tme"], target, task=self.task, process_group=self.process_group
            )
            for mag, f in features.items()
        }

    def apply(self) -> dict[str, CGCReport]:
        reports = {mag: coordinate_gradients(self.heads[mag], conf) for mag, conf in self._confidences.items()}
        self._confidences = {}
        return reports
