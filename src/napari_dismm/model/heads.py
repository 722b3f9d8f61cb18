"""Task heads shared by every model, and the rule that combines magnifications.

Classification logits go through softmax. Survival logits are discrete-time hazards
(one per bin): h = sigmoid(logit), S = cumprod(1 - h), risk = -sum(S) (higher = worse).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from napari_dismm.errors import ModelConfigError

TASKS: tuple[str, str] = ("classification", "survival")
COMBINE_RULES: tuple[str, str] = ("max_confidence", "mean")


def check_task(task: str) -> str:
    """Return ``task`` if known, else raise ModelConfigError naming the choices."""
    if task not in TASKS:
        raise ModelConfigError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def describe_logits(logits: Tensor, *, task: str) -> dict[str, Tensor]:
    """Derived quantities for the ModelOutput fields of ``task``."""
    if check_task(task) == "classification":
        return {"probabilities": logits.softmax(dim=-1)}
    hazards = torch.sigmoid(logits)
    survival = torch.cumprod(1.0 - hazards, dim=-1)
    return {"hazards": hazards, "survival": survival, "risk": -survival.sum(dim=-1)}


def confidence(logits: Tensor, *, task: str) -> Tensor:
    """Per-sample confidence (B,): the largest softmax probability over the outputs.

    For survival the bin logits are read as a categorical over bins (softmax), the same
    reading CGC uses, so a magnification that puts its mass on one bin is "more sure"."""
    check_task(task)
    return logits.softmax(dim=-1).amax(dim=-1)


def combine_magnifications(
    logits: dict[str, Tensor], *, task: str, how: str = "max_confidence"
) -> Tensor:
    """Combine per-magnification logits (each (B, C)) into one (B, C).

    ``max_confidence`` (reference): per sample, the logits of the magnification with the
    highest ``confidence`` (ties go to the first in dict order). ``mean``: the mean of the
    probabilities, returned as logits that map back to it (log of the mean softmax for
    classification; logit of the mean hazards for survival)."""
    check_task(task)
    if how not in COMBINE_RULES:
        raise ModelConfigError(f"unknown combine rule {how!r}; expected one of {', '.join(COMBINE_RULES)}")
    if not logits:
        raise ModelConfigError("no magnification to combine")
    stacked = torch.stack(list(logits.values()), dim=0)  # (M, B, C)
    if stacked.shape[0] == 1:
        return stacked[0]
    if how == "max_confidence":
        conf = confidence(stacked, task=task)  # (M, B)
        best = conf.argmax(dim=0)  # (B,) first maximum wins
        index = best.view(1, -1, 1).expand(1, *stacked.shape[1:])
        return stacked.gather(0, index).squeeze(0)
    if task == "classification":
        return stacked.softmax(dim=-1).mean(dim=0).log()
    eps = torch.finfo(stacked.dtype).eps
    return torch.logit(torch.sigmoid(stacked).mean(dim=0), eps=eps)


class TaskHead(nn.Module):
    """A Linear head for one feature vector (baselines, student)."""

    def __init__(self, *, task: str, in_features: int, n_outputs: int) -> None:
        super().__init__()
        self.task = check_task(task)
        self.linear = nn.Linear(in_features, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)

    def describe(self, logits: Tensor) -> dict[str, Tensor]:
        return describe_logits(logits, task=self.task)


class SubspaceFusionHead(nn.Module):
    """Concatenate tumor and TME features and apply ONE Linear(2d -> C).

    Its weight splits into a tumor block W[:, :d] and a TME block W[:, d:]; CGC acts on the
    gradients of these two blocks, and ``subspace_logits`` gives each subspace's share of
    the logits (o_u = f_u W_u^T + b/2, so o_T + o_E equals the fused logits)."""

    def __init__(self, *, task: str, d: int, n_outputs: int) -> None:
        super().__init__()
        self.task = check_task(task)
        self.d = d
        self.linear = nn.Linear(2 * d, n_outputs)

    def forward(self, f_tumor: Tensor, f_tme: Tensor) -> Tensor:
        return self.linear(torch.cat([f_tumor, f_tme], dim=-1))

    def subspace_logits(self, f_tumor: Tensor, f_tme: Tensor) -> tuple[Tensor, Tensor]:
        weight, half_bias = self.linear.weight, self.linear.bias / 2
        o_tumor = f_tumor @ weight[:, : self.d].T + half_bias
        o_tme = f_tme @ weight[:, self.d :].T + half_bias
        return o_tumor, o_tme

    def describe(self, logits: Tensor) -> dict[str, Tensor]:
        return describe_logits(logits, task=self.task)
