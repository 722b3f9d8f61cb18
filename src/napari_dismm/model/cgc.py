"""Confidence-guided gradient coordination (CGC) on a SubspaceFusionHead.

Use, per training step and per fusion head:

    conf = subspace_confidences(head, f_tumor, f_tme, target, task=task)   # before backward
    loss.backward()
    report = coordinate_gradients(head, conf)                              # before step

If the tumor and TME weight-gradient blocks point against each other (cosine < 0), the
block of the LESS confident subspace is projected once onto the normal plane of the more
confident one: g <- g - (g.h / |h|^2) h. Ties go to tumor (TME is projected).

Granularity (``granularity``). ``"block"`` (ours, the default until measured otherwise)
takes each subspace's whole (C, d) weight-gradient block as one vector: one cosine, one
projection. ``"row"`` is what the reference code does: each class row c of the head (the
weights that make logit c) separately; rows whose tumor and TME parts have a negative
cosine have the less confident part projected onto the normal plane of the other's,
then rescaled to the norm it had (the reference's step), and the other rows are left
alone. Row-wise, a conflict on one class is resolved even when the blocks as a whole
agree, and classes without conflict keep their full gradient. Which subspace is the
less confident is decided once per step for both (the confidences are per subspace).

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


GRANULARITIES = ("block", "row")


@dataclass(frozen=True)
class CGCReport:
    """What CGC did in one step: the cosine between the whole blocks (before projection),
    which subspace's gradient was projected (None when nothing was: cosine >= 0 or
    undefined, or no conflicting row), the two confidences used for the decision, and how
    many class rows were projected (all of them when a block was)."""

    cosine: float
    projected: str | None
    confidence_tumor: float
    confidence_tme: float
    rows_projected: int = 0


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


def _project_rows(g: Tensor, h: Tensor, conflict: Tensor) -> Tensor:
    """Rows of g (C, d) where ``conflict``: projected onto the normal plane of the same row
    of h, then rescaled to their former norm. A row that (nearly) vanishes, i.e. was
    anti-parallel to h, is set to zero: rescaling its round-off would invent a direction."""
    hh = (h * h).sum(dim=1, keepdim=True)
    projected = g - (g * h).sum(dim=1, keepdim=True) / hh.clamp_min(torch.finfo(h.dtype).tiny) * h
    before, after = g.norm(dim=1, keepdim=True), projected.norm(dim=1, keepdim=True)
    kept = after > 1e-7 * before  # float64 round-off is ~1e-16 of the norm
    projected = torch.where(kept, projected * before / after.clamp_min(torch.finfo(g.dtype).tiny), 0.0)
    return torch.where(conflict[:, None], projected, g)


@torch.no_grad()
def coordinate_gradients(head: SubspaceFusionHead, confidences: Tensor, *, granularity: str = "block") -> CGCReport:
    """Project the less confident subspace's gradient where the two conflict; in place.

    ``granularity``: "block" (whole blocks) or "row" (per class row, the reference's)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown CGC granularity {granularity!r}; expected one of {GRANULARITIES}")
    grad = head.linear.weight.grad
    s_tumor, s_tme = (float(c) for c in confidences)
    if grad is None:
        return CGCReport(float("nan"), None, s_tumor, s_tme)
    d = head.d
    g_tumor, g_tme = grad[:, :d], grad[:, d:]
    # work in float64 so orthogonality holds to round-off of the final cast only
    t, e = g_tumor.double(), g_tme.double()
    norms = t.norm() * e.norm()
    cosine = float((t * e).sum() / norms) if norms > 0 else float("nan")
    tumor_first = s_tumor >= s_tme
    projected, block, g, h = ("tme", g_tme, e, t) if tumor_first else ("tumor", g_tumor, t, e)
    if granularity == "block":
        if norms == 0 or cosine >= 0:
            return CGCReport(cosine, None, s_tumor, s_tme)
        g = g - (g * h).sum() / (h * h).sum() * h
        block.copy_(g.to(block.dtype))
        return CGCReport(cosine, projected, s_tumor, s_tme, rows_projected=grad.shape[0])
    conflict = (t * e).sum(dim=1) < 0  # a zero row has cosine 0 (no conflict)
    if not conflict.any():
        return CGCReport(cosine, None, s_tumor, s_tme)
    block.copy_(_project_rows(g, h, conflict).to(block.dtype))
    return CGCReport(cosine, projected, s_tumor, s_tme, rows_projected=int(conflict.sum()))


class CGCStep:
    """Convenience for models with one SubspaceFusionHead per magnification
    (``model.fusion_heads``; under DDP pass ``ddp.module.fusion_heads``): ``observe``
    before backward, ``apply`` after it. ``enabled=False`` (config ``cgc``) makes both
    no-ops, for ablations; ``granularity`` (config ``cgc_granularity``) as in
    ``coordinate_gradients``."""

    def __init__(
        self,
        heads: dict[str, SubspaceFusionHead],
        *,
        task: str,
        enabled: bool = True,
        process_group: object | None = None,
        granularity: str = "block",
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown CGC granularity {granularity!r}; expected one of {GRANULARITIES}")
        self.heads = heads
        self.granularity = granularity
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
        reports = {mag: coordinate_gradients(self.heads[mag], conf, granularity=self.granularity)
                   for mag, conf in self._confidences.items()}
        self._confidences = {}
        return reports
