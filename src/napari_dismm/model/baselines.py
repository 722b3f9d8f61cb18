"""Baselines that share the heads and the output format with DisMM.

- ABMIL: gated-attention MIL (Ilse et al., 2018), WSI only.
- Late fusion: ABMIL slide feature + an SNN over all genes (tumor then TME, concatenated),
  concatenated and fed to one head.
- Genes only: the teacher's gene path alone (an SNN per subspace, the subspace fusion head);
  it takes the bags only for the shared signature. The bar the teacher must clear on
  cohorts whose label lives in the expression.

Their attention is a single map, returned as ``attention[mag]["abmil"]`` (not copied into
the "tumor"/"tme" slots, which would claim a disentanglement these models do not have);
the viewer shows it as one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from napari_dismm.model.config import validate_common
from napari_dismm.model.heads import SubspaceFusionHead, TaskHead, combine_magnifications
from napari_dismm.model.inputs import check_bags, check_genes, mask_for
from napari_dismm.model.layers import SNN, PatchEmbedding, masked_softmax
from napari_dismm.model.outputs import ModelOutput


@dataclass
class ABMILConfig:
    kind: str = "abmil"
    task: str = "classification"
    n_outputs: int = 4
    d_in: int = 1024
    d: int = 128
    magnifications: tuple[str, ...] = ("10x", "20x")
    dropout: float = 0.25
    combine: str = "max_confidence"

    def __post_init__(self) -> None:
        validate_common(self)


@dataclass
class LateFusionConfig:
    kind: str = "late_fusion"
    task: str = "classification"
    n_outputs: int = 4
    d_in: int = 1024
    d: int = 128
    magnifications: tuple[str, ...] = ("10x", "20x")
    n_tumor_genes: int = 59
    n_tme_genes: int = 361
    dropout: float = 0.25
    combine: str = "max_confidence"

    def __post_init__(self) -> None:
        validate_common(self)


@dataclass
class GenesOnlyConfig(LateFusionConfig):
    """Late fusion's settings; the slide part (d_in, magnifications) only checks the bags."""

    kind: str = "genes_only"


class GatedAttentionPool(nn.Module):
    """a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i))); returns (sum_i a_i h_i, a)."""

    def __init__(self, d: int, *, d_attn: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        d_attn = d_attn or d
        self.v = nn.Sequential(nn.Linear(d, d_attn), nn.Tanh(), nn.Dropout(dropout))
        self.u = nn.Sequential(nn.Linear(d, d_attn), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(d_attn, 1)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        scores = self.w(self.v(tokens) * self.u(tokens)).squeeze(-1)  # (B, N)
        attn = masked_softmax(scores, mask, dim=-1)
        return torch.einsum("bn,bnd->bd", attn, tokens), attn


class _ABMILBranches(nn.Module):
    """Patch embedding + gated attention per magnification."""

    def __init__(self, config: ABMILConfig | LateFusionConfig) -> None:
        super().__init__()
        self.embed = nn.ModuleDict(
            {m: PatchEmbedding(config.d_in, config.d, dropout=config.dropout) for m in config.magnifications}
        )
        self.pool = nn.ModuleDict(
            {m: GatedAttentionPool(config.d, dropout=config.dropout) for m in config.magnifications}
        )

    def forward(self, mag: str, bag: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.pool[mag](self.embed[mag](bag), mask)


def _output(logits: dict[str, Tensor], attention, features, head: TaskHead, config) -> ModelOutput:
    combined = combine_magnifications(logits, task=config.task, how=config.combine)
    out = ModelOutput(logits=combined, per_magnification_logits=logits, attention=attention, features=features)
    return out.fill_derived(head.describe(combined))


class ABMIL(nn.Module):
    """WSI-only gated-attention MIL, one branch and one head per magnification."""

    def __init__(self, config: ABMILConfig) -> None:
        super().__init__()
        validate_common(config)
        self.config = config
        self.branches = _ABMILBranches(config)
        self.heads = nn.ModuleDict(
            {m: TaskHead(task=config.task, in_features=config.d, n_outputs=config.n_outputs) for m in config.magnifications}
        )

    def forward(self, bags, *, coords=None, masks=None, genes=None, footprints=None) -> ModelOutput:
        """``coords``, ``genes`` and ``footprints`` are accepted for the shared signature and ignored."""
        cfg = self.config
        present = check_bags(bags, masks, magnifications=cfg.magnifications, d_in=cfg.d_in)
        logits, attention, features = {}, {}, {}
        for mag in present:
            pooled, attn = self.branches(mag, bags[mag], mask_for(masks, mag))
            logits[mag] = self.heads[mag](pooled)
            attention[mag], features[mag] = {"abmil": attn}, {"abmil": pooled}
        return _output(logits, attention, features, self.heads[present[0]], cfg)


class LateFusion(nn.Module):
    """ABMIL slide feature + SNN gene feature, concatenated into one head per magnification."""

    def __init__(self, config: LateFusionConfig) -> None:
        super().__init__()
        validate_common(config)
        self.config = config
        self.branches = _ABMILBranches(config)
        self.genes = SNN(config.n_tumor_genes + config.n_tme_genes, config.d, dropout=config.dropout)
        self.heads = nn.ModuleDict(
            {
                m: TaskHead(task=config.task, in_features=2 * config.d, n_outputs=config.n_outputs)
                for m in config.magnifications
            }
        )

    def forward(self, bags, *, coords=None, masks=None, genes=None, footprints=None) -> ModelOutput:
        cfg = self.config
        present = check_bags(bags, masks, magnifications=cfg.magnifications, d_in=cfg.d_in)
        batch = bags[present[0]].shape[0]
        genes = check_genes(genes, widths={"tumor": cfg.n_tumor_genes, "tme": cfg.n_tme_genes}, batch=batch)
        gene_feature = self.genes(torch.cat([genes["tumor"], genes["tme"]], dim=-1))
        logits, attention, features = {}, {}, {}
        for mag in present:
            pooled, attn = self.branches(mag, bags[mag], mask_for(masks, mag))
            logits[mag] = self.heads[mag](torch.cat([pooled, gene_feature], dim=-1))
            attention[mag] = {"abmil": attn}
            features[mag] = {"abmil": pooled, "genes": gene_feature}
        return _output(logits, attention, features, self.heads[present[0]], cfg)


class GenesOnly(nn.Module):
    """Tumor and TME gene vectors -> an SNN each -> SubspaceFusionHead; no slide."""

    def __init__(self, config: GenesOnlyConfig) -> None:
        super().__init__()
        validate_common(config)
        self.config = config
        self.encoders = nn.ModuleDict({
            "tumor": SNN(config.n_tumor_genes, config.d, dropout=config.dropout),
            "tme": SNN(config.n_tme_genes, config.d, dropout=config.dropout),
        })
        self.head = SubspaceFusionHead(task=config.task, d=config.d, n_outputs=config.n_outputs)

    def forward(self, bags, *, coords=None, masks=None, genes=None, footprints=None) -> ModelOutput:
        """The same logits stand for every magnification given (the slide is not read)."""
        cfg = self.config
        present = check_bags(bags, masks, magnifications=cfg.magnifications, d_in=cfg.d_in)
        batch = bags[present[0]].shape[0]
        genes = check_genes(genes, widths={"tumor": cfg.n_tumor_genes, "tme": cfg.n_tme_genes}, batch=batch)
        f = {u: self.encoders[u](genes[u]) for u in ("tumor", "tme")}
        logits = self.head(f["tumor"], f["tme"])
        out = ModelOutput(logits=logits, per_magnification_logits={m: logits for m in present},
                          attention={m: {} for m in present}, features={m: dict(f) for m in present})
        return out.fill_derived(self.head.describe(logits))
