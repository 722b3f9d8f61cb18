"""What every model returns, so the trainer, the predictor and the viewer read one shape.

Shapes are named in comments: B = batch, N = patches (padded), K = merged tokens,
d = feature width, C = classes (or survival bins).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

SUBSPACES: tuple[str, str] = ("tumor", "tme")


@dataclass
class ITAResult:
    """Informative token aggregation at one magnification (student only)."""

    cluster: Tensor  # (B, N) long, cluster id in [0, K); -1 for padding
    is_centre: Tensor  # (B, N) bool
    weight: Tensor  # (B, N) float, w = exp(score); 0 for padding
    merged: Tensor  # (B, K, d) merged tokens
    subspace: Tensor  # (B, K) long: 0 = tumor, 1 = TME


@dataclass
class ModelOutput:
    """One forward pass. ``attention[mag]`` holds ``"tumor"`` and ``"tme"`` maps for the
    DisMM models and a single ``"abmil"`` map for the ABMIL-based baselines; every map sums
    to 1 over the valid patches of a sample and is 0 on padding."""

    logits: Tensor  # (B, C), combined over magnifications
    per_magnification_logits: dict[str, Tensor]  # mag -> (B, C)
    attention: dict[str, dict[str, Tensor]]  # mag -> name -> (B, N)
    features: dict[str, dict[str, Tensor]]  # mag -> name -> (B, d)
    ita: dict[str, ITAResult] | None = None
    # derived by the head (TaskHead.describe): classification fills probabilities;
    # survival fills hazards, survival and risk.
    probabilities: Tensor | None = None  # (B, C)
    hazards: Tensor | None = None  # (B, n_bins)
    survival: Tensor | None = None  # (B, n_bins)
    risk: Tensor | None = None  # (B,)
    extras: dict[str, Tensor] = field(default_factory=dict)  # model-specific diagnostics

    def fill_derived(self, derived: dict[str, Tensor]) -> "ModelOutput":
        """Copy the head's ``describe`` result into the named fields; returns self."""
        for key, value in derived.items():
            setattr(self, key, value)
        return self
