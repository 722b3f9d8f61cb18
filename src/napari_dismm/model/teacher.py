"""The DisMM teacher (stage I): WSI patches + tumor/TME gene vectors -> prediction.

Per magnification: patch embedding, each token mixed with its lattice neighbourhood
(model/context.py), then DMF (one gene-queried cross-attention per
subspace) gives the tumor and TME slide features and their per-patch attention; the
SubspaceFusionHead turns the pair into logits. The gene encoders (SNNs) are shared by the
magnifications; the magnifications' logits are combined (max confidence by default).

Genes in the prediction (``gene_residual``, as the reference keeps a residual of the gene
embedding): each subspace feature is the attention-pooled slide feature plus its gene
embedding, so the head reads the expression too. A teacher whose genes only choose where to
look lost to late fusion and to expression alone (0.76 vs 0.98 AUC, issue 13). What keeps
the maps meaningful once the head can read the genes: a second head per magnification on
the slide features alone (``slide_head``), trained on the task beside the fused one, so the
attention must still find the patches that carry the label; and ``gene_dropout``, which
drops a sample's gene embedding in training (from the query and the residual) so the fused
head cannot lean on the genes alone. With ``base_query`` each subspace has a learned query of
its own to which the gene embedding is added: where the expression says nothing about the
slide, the attention still has a query that does not vary at random from patient to patient.
With ``gene_gate`` (format 4) the gene embedding enters the query and the residual through a
learned scalar per subspace that starts at 0: the teacher begins as a slide model and lets
the genes in as far as they lower the loss. Without it, noise genes (label in the slide only)
let the fused head memorise training patients before the attention had found the label's
patches: one fold of three at AUC 0.67 where ABMIL reached 1.0 (issue 13).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from napari_dismm.errors import DataError, ModelConfigError
from napari_dismm.model.cgc import GRANULARITIES as CGC_GRANULARITIES
from napari_dismm.model.config import validate_common
from napari_dismm.model.context import magnification_number, with_context
from napari_dismm.model.dmf import SubspaceCrossAttention
from napari_dismm.model.heads import SubspaceFusionHead, combine_magnifications
from napari_dismm.model.inputs import bag_steps, check_bags, check_genes, mask_for
from napari_dismm.model.layers import SNN, PatchEmbedding
from napari_dismm.model.losses import DEV_FORMS
from napari_dismm.model.outputs import SUBSPACES, ModelOutput
from napari_dismm.model.probes import FrozenProbe, pooled_magnifications


#: the gene gates are read as GATE_GAIN x their parameter, so under Adam they open GATE_GAIN
#: times as fast as a plain weight would: at 1, 20 epochs of a 48-patient cohort (~80 steps)
#: left the genes half in (label in the genes only: AUC 0.974 vs expression alone 0.995); at 10
#: the noise genes memorised again (label in the slide only: one fold at 0.59); 3 did both.
GATE_GAIN = 3.0

#: key prefix of the slide-only head's logits in ``ModelOutput.extras`` (one per magnification)
SLIDE_LOGITS = "slide_logits."


@dataclass
class TeacherConfig:
    """Architecture and the training switches that belong to the teacher.

    ``n_outputs`` is the number of classes (classification) or time bins (survival).
    ``cgc``, ``dev_weight``, ``dev_scale`` and ``patch_size_10x_level0`` are read by the
    training loop (CGC toggle for ablations and ``cgc_granularity``, "block" or "row",
    model/cgc.py; DEV loss weight, scale and the 10x patch size
    in level-0 pixels for pooling onto the 10x grid). ``subspace_split=False`` is the
    ablation without knowledge-driven subspaces: one gene encoder reads all genes and queries
    both subspaces, so nothing but their own attention weights tells tumor from TME.
    ``spatial_context``: the weight of each patch's 3 x 3 lattice neighbourhood in its token
    before the cross-attention (0 = off; model/context.py); needs the patch coordinates.
    ``probes``: frozen linear paths on the mean patch features and the genes (module doc)."""

    kind: str = "teacher"
    task: str = "classification"
    n_outputs: int = 4
    d_in: int = 1024
    d: int = 128
    magnifications: tuple[str, ...] = ("10x", "20x")
    n_tumor_genes: int = 59
    n_tme_genes: int = 361
    dropout: float = 0.25
    n_heads: int = 4
    combine: str = "max_confidence"
    cgc: bool = True
    cgc_granularity: str = "block"
    dev_weight: float = 3e-4
    dev_scale: float = 1.0  # issue 14: DEV is the mean of the subspaces' terms at scale 1 (was sum x 1e4)
    dev_form: str = "agreement"
    patch_size_10x_level0: float = 448.0
    subspace_split: bool = True
    spatial_context: float = 0.5
    gene_residual: bool = True
    slide_head: bool = True
    gene_dropout: float = 0.25
    base_query: bool = True
    gene_gate: bool = True
    probes: bool = False

    def __post_init__(self) -> None:
        validate_common(self)
        if self.n_heads < 1 or self.d % self.n_heads:
            raise ModelConfigError(f"d={self.d} must be divisible by n_heads={self.n_heads}")
        if self.cgc_granularity not in CGC_GRANULARITIES:
            raise ModelConfigError(f"cgc_granularity must be one of {', '.join(CGC_GRANULARITIES)}, "
                                   f"got {self.cgc_granularity!r}")
        if self.dev_form not in DEV_FORMS:
            raise ModelConfigError(f"dev_form must be one of {', '.join(DEV_FORMS)}, got {self.dev_form!r}")
        if self.patch_size_10x_level0 <= 0:
            raise ModelConfigError(f"patch_size_10x_level0 must be > 0, got {self.patch_size_10x_level0}")
        if not 0 <= self.gene_dropout < 1:
            raise ModelConfigError(f"gene_dropout must be in [0, 1), got {self.gene_dropout}")
        if not 0 <= self.spatial_context <= 1:
            raise ModelConfigError(f"spatial_context must be in [0, 1], got {self.spatial_context}")
        if self.spatial_context:
            try:
                for mag in self.magnifications:
                    magnification_number(mag)
            except ValueError as error:
                raise ModelConfigError(f"spatial_context needs magnifications like '20x': {error}") from error


class Teacher(nn.Module):
    """Multi-modal teacher; ``forward`` follows the shared model-input convention."""

    def __init__(self, config: TeacherConfig) -> None:
        super().__init__()
        validate_common(config)
        self.config = config
        d = config.d
        if config.subspace_split:
            self.gene_encoders = nn.ModuleDict(
                {
                    "tumor": SNN(config.n_tumor_genes, d, dropout=config.dropout),
                    "tme": SNN(config.n_tme_genes, d, dropout=config.dropout),
                }
            )
        else:
            self.gene_encoders = nn.ModuleDict(
                {"all": SNN(config.n_tumor_genes + config.n_tme_genes, d, dropout=config.dropout)}
            )
        self.embed = nn.ModuleDict(
            {m: PatchEmbedding(config.d_in, d, dropout=config.dropout) for m in config.magnifications}
        )
        self.dmf = nn.ModuleDict(
            {
                m: nn.ModuleDict(
                    {u: SubspaceCrossAttention(d=d, n_heads=config.n_heads, dropout=config.dropout) for u in SUBSPACES}
                )
                for m in config.magnifications
            }
        )
        self.fusion_heads = nn.ModuleDict(
            {m: SubspaceFusionHead(task=config.task, d=d, n_outputs=config.n_outputs) for m in config.magnifications}
        )
        if config.base_query:
            self.base_queries = nn.ParameterDict({u: nn.Parameter(torch.zeros(d)) for u in SUBSPACES})
        if config.gene_gate:
            self.gene_gates = nn.ParameterDict(
                {f"{part}_{u}": nn.Parameter(torch.zeros(1)) for part in ("query", "residual") for u in SUBSPACES}
            )
        if config.slide_head:
            self.slide_heads = nn.ModuleDict(
                {m: SubspaceFusionHead(task=config.task, d=d, n_outputs=config.n_outputs) for m in config.magnifications}
            )
        if config.probes:
            self.slide_probe = FrozenProbe(config.d_in * len(config.magnifications), config.n_outputs)
            self.gene_probe = FrozenProbe(config.n_tumor_genes + config.n_tme_genes, config.n_outputs)

    def forward(
        self,
        bags: dict[str, Tensor],
        *,
        coords: dict[str, Tensor] | None = None,
        masks: dict[str, Tensor] | None = None,
        genes: dict[str, Tensor] | None = None,
        footprints: dict[str, Tensor] | None = None,
        with_probes: bool = True,
    ) -> ModelOutput:
        """``coords`` place each patch's neighbourhood (``spatial_context``; DEV pooling
        reads them in the loss too); ``footprints[mag]`` (B,) each bag's patch side in
        level-0 px (absent or NaN: ``patch_size_10x_level0`` scaled to the magnification).
        ``with_probes=False`` (training): the teacher's own logits, without its probes'."""
        cfg = self.config
        present = check_bags(bags, masks, magnifications=cfg.magnifications, d_in=cfg.d_in)
        batch = bags[present[0]].shape[0]
        genes = check_genes(genes, widths={"tumor": cfg.n_tumor_genes, "tme": cfg.n_tme_genes}, batch=batch)
        if cfg.spatial_context and (coords is None or any(m not in coords for m in present)):
            raise DataError("this teacher looks at each patch's neighbours (spatial_context > 0): "
                            "it needs the patch coordinates of every magnification")
        embedded = self._gene_dropout(self._queries(genes), batch)
        residual = self._gated(embedded, "residual") if cfg.gene_residual else None
        queries = self._gated(embedded, "query")
        if cfg.base_query:
            queries = {u: g + self.base_queries[u] for u, g in queries.items()}
        logits, attention, features, extras = {}, {}, {}, {}
        probe_logits = None
        if cfg.probes and with_probes:
            pooled = pooled_magnifications(bags, masks, cfg.magnifications, self.slide_probe.mean)
            probe_logits = self.slide_probe(pooled) + self.gene_probe(torch.cat([genes[u] for u in SUBSPACES], dim=-1))
        for mag in present:
            tokens = self.embed[mag](bags[mag])
            mask = mask_for(masks, mag)
            if cfg.spatial_context:
                step = bag_steps(footprints, mag, batch=batch, device=tokens.device,
                                 default=cfg.patch_size_10x_level0 * 10.0 / magnification_number(mag))
                tokens = with_context(tokens, coords[mag], mask, step=step, weight=cfg.spatial_context)
            attention[mag], features[mag] = {}, {}
            slide = {}
            for u in SUBSPACES:
                slide[u], attention[mag][u] = self.dmf[mag][u](queries[u], tokens, mask)
                features[mag][u] = slide[u] if residual is None else slide[u] + residual[u]
            logits[mag] = self.fusion_heads[mag](features[mag]["tumor"], features[mag]["tme"])
            if probe_logits is not None:
                logits[mag] = logits[mag] + probe_logits
            if cfg.slide_head:
                extras[SLIDE_LOGITS + mag] = self.slide_heads[mag](slide["tumor"], slide["tme"])
        combined = combine_magnifications(logits, task=cfg.task, how=cfg.combine)
        output = ModelOutput(
            logits=combined, per_magnification_logits=logits, attention=attention, features=features, extras=extras
        )
        return output.fill_derived(self.fusion_heads[present[0]].describe(combined))

    def _gated(self, embedded: dict[str, Tensor], part: str) -> dict[str, Tensor]:
        """With ``gene_gate``, the gene embedding scaled by a learned scalar that starts at 0."""
        if not self.config.gene_gate:
            return embedded
        return {u: g * (GATE_GAIN * self.gene_gates[f"{part}_{u}"]) for u, g in embedded.items()}

    def _gene_dropout(self, queries: dict[str, Tensor], batch: int) -> dict[str, Tensor]:
        """In training a sample's gene embeddings are dropped together with probability
        ``gene_dropout`` (not rescaled: at inference the model always sees them)."""
        p = self.config.gene_dropout
        if not (self.training and p > 0):
            return queries
        keep = (torch.rand(batch, 1, device=queries["tumor"].device) >= p).to(queries["tumor"].dtype)
        return {u: q * keep for u, q in queries.items()}

    def _queries(self, genes: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per subspace, the gene embedding that queries the patches."""
        if self.config.subspace_split:
            return {u: self.gene_encoders[u](genes[u]) for u in SUBSPACES}
        shared = self.gene_encoders["all"](torch.cat([genes[u] for u in SUBSPACES], dim=-1))
        return {u: shared for u in SUBSPACES}
