"""The WSI-only DisMM student (stage II): patch features -> prediction, no genes.

Per magnification: patch embedding -> linear-cost token mixing -> informative token
aggregation (ITA, K merged tokens) -> each merged token mapped to the tumor or TME
subspace by its nearest subspace prototype -> the subspace features f_T, f_E -> the
SubspaceFusionHead. The magnifications' logits are combined (max confidence by default).

Bags are processed one at a time on their valid patches, in a canonical order given by
``permutation_keys`` (hash of coordinates and feature bits), and the results are put
back at the patches' own positions: permuting a bag permutes every per-patch output and
leaves the rest bit-identical, and nothing of size (B, N, N) or a padded copy of a 200k
bag is ever built. The patch embedding is applied in chunks gathered straight from the
caller's tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from napari_dismm.errors import DataError, ModelConfigError
from napari_dismm.model.config import validate_common
from napari_dismm.model.heads import SubspaceFusionHead, combine_magnifications
from napari_dismm.model.context import magnification_number
from napari_dismm.model.inputs import bag_steps, check_bags, mask_for
from napari_dismm.model.ita import (
    ASSIGNMENTS,
    CANDIDATES,
    MEMBERSHIP_SCALES,
    BagAggregation,
    InformativeTokenAggregation,
    default_prototypes,
    permutation_keys,
)
from napari_dismm.model.layers import PatchEmbedding
from napari_dismm.model.mixing import TokenMixer
from napari_dismm.model.outputs import SUBSPACES, ITAResult, ModelOutput
from napari_dismm.model.probes import FrozenProbe, MapScorers, pooled_magnifications

__all__ = ["PROBE_POOLINGS", "Student", "StudentConfig"]

#: what the student's frozen probe reads: the mean patch features of every magnification, or
#: those and the features pooled by per-patch scores fitted to the teacher's maps
PROBE_POOLINGS = ("mean", "teacher_maps")


@dataclass
class StudentConfig:
    """Architecture of the student. ``n_outputs``: classes or survival time bins.

    ITA: ``k`` merged tokens (reference 2), ``knn`` neighbours for the density,
    ``n_anchors`` tokens sampled (in key order) on which DPC-kNN chooses the centres
    (exact when the bag is no larger); ``candidates``: "anchors" (the centres come from
    that sample, format 4 on) or "densest" (format <= 3: every token's density against
    the anchors, centres among the ``n_candidates`` densest tokens). Mixing:
    ``n_mixing_layers`` efficient-attention blocks with ``n_heads`` heads; ``use_coords``
    adds an MLP of the real coordinates.
    ``chunk_size`` bounds the tokens processed at once (memory vs. speed).
    ``assignment``: "soft" (memberships at ``temperature`` in units of
    ``membership_scale``, gradients reach the clustering) or "hard" (the reference's
    nearest centre); ``membership_scale`` "spread" (of all distances, the default) or
    "width" (the clusters' own width: memberships sharpen as the clusters separate, which
    cost the planted student's maps; README); see ``model.ita``. ``probes``: a frozen linear
    path on the mean patch features of every magnification whose logits the student adds to
    each magnification's (model/probes.py; the teacher's, without the genes);
    ``probe_pooling`` "teacher_maps": the probe also reads each magnification's patch
    features, mixed with their lattice neighbourhood at weight ``probe_context``, pooled by
    frozen tumor / TME scores fitted to the teacher's maps (``MapScorers``);
    ``patch_size_10x_level0`` stands in for a bag's footprint where its file gives none."""

    kind: str = "student"
    task: str = "classification"
    n_outputs: int = 4
    d_in: int = 1024
    d: int = 128
    magnifications: tuple[str, ...] = ("10x", "20x")
    k: int = 2
    knn: int = 5
    n_anchors: int = 2048
    n_candidates: int = 1024
    n_heads: int = 4
    n_mixing_layers: int = 1
    ffn_mult: int = 2
    use_coords: bool = True
    dropout: float = 0.1
    score_clamp: float = 10.0
    chunk_size: int = 16384
    combine: str = "max_confidence"
    assignment: str = "soft"
    temperature: float = 2.0
    candidates: str = "anchors"
    membership_scale: str = "spread"
    probes: bool = False
    probe_pooling: str = "mean"
    probe_context: float = 0.5
    patch_size_10x_level0: float = 448.0

    def __post_init__(self) -> None:
        self.magnifications = tuple(self.magnifications)
        validate_common(self)
        if self.kind != "student":
            raise ModelConfigError(f"StudentConfig.kind must be 'student', got {self.kind!r}")
        checks = {
            "k": self.k >= 1,
            "knn": self.knn >= 1,
            "n_anchors": self.n_anchors >= 2,
            "n_candidates": self.n_candidates >= self.k,
            "n_heads": self.n_heads >= 1 and self.d % self.n_heads == 0,
            "n_mixing_layers": self.n_mixing_layers >= 0,
            "ffn_mult": self.ffn_mult >= 1,
            "score_clamp": self.score_clamp > 0,
            "chunk_size": self.chunk_size >= 1,
            "assignment": self.assignment in ASSIGNMENTS,
            "temperature": self.temperature > 0,
            "candidates": self.candidates in CANDIDATES,
            "membership_scale": self.membership_scale in MEMBERSHIP_SCALES,
            "probe_pooling": self.probe_pooling in PROBE_POOLINGS,
            "probe_context": 0 <= self.probe_context <= 1,
            "patch_size_10x_level0": self.patch_size_10x_level0 > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ModelConfigError(
                f"invalid StudentConfig value(s) for {', '.join(bad)} "
                f"(need k, knn >= 1, n_anchors >= 2, n_candidates >= k, d divisible by n_heads, "
                f"assignment one of {ASSIGNMENTS}, temperature > 0, candidates one of {CANDIDATES}, "
                f"membership_scale one of {MEMBERSHIP_SCALES}, probe_pooling one of {PROBE_POOLINGS}, "
                f"probe_context in [0, 1], patch_size_10x_level0 > 0)"
            )


class StudentBranch(nn.Module):
    """One magnification's path from patch features to (tumor, TME) features."""

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        cfg = config
        self.chunk_size = cfg.chunk_size
        self.embed = PatchEmbedding(cfg.d_in, cfg.d, dropout=cfg.dropout)
        self.mixer = TokenMixer(
            cfg.d, n_layers=cfg.n_mixing_layers, n_heads=cfg.n_heads, ffn_mult=cfg.ffn_mult,
            dropout=cfg.dropout, use_coords=cfg.use_coords, chunk_size=cfg.chunk_size,
        )
        self.ita = InformativeTokenAggregation(
            cfg.d, k=cfg.k, knn=cfg.knn, n_anchors=cfg.n_anchors, n_candidates=cfg.n_candidates,
            score_clamp=cfg.score_clamp, chunk_size=min(cfg.chunk_size, 8192),
            assignment=cfg.assignment, temperature=cfg.temperature, candidates=cfg.candidates,
            membership_scale=cfg.membership_scale,
        )

    def run_bag(
        self, x: Tensor, *, valid: Tensor, coords: Tensor | None, prototypes: Tensor
    ) -> tuple[Tensor, BagAggregation]:
        """One bag: ``x`` (N, d_in) as given, ``valid`` (n,) its real rows.

        Returns the rows in canonical order (``source`` (n,) positions into x) and the ITA
        of those rows in that order."""
        bag_coords = None if coords is None else coords.index_select(0, valid)
        keys = permutation_keys(features=x[:, :16].index_select(0, valid), coords=bag_coords)
        order = torch.sort(keys, stable=True).indices
        source = valid[order]
        # project the real rows (a view when they are a prefix, as after padding at the end),
        # then reorder the d-wide tokens: the embedding's backward keeps no gathered copy of the
        # d_in-wide input (~4 KB per patch at d_in 1024); dropout after the reorder, chunk by
        # chunk, draws the masks embedding the reordered chunks would
        n = valid.numel()
        rows = x[:n] if n and int(valid[-1]) == n - 1 else x.index_select(0, valid)
        projected = [self.embed.project(part) for part in rows.split(self.chunk_size)]
        if projected:
            ordered = torch.cat(projected).index_select(0, order)
            tokens = torch.cat([self.embed.drop(part) for part in ordered.split(self.chunk_size)])
        else:
            tokens = x.new_zeros(0, self.ita.scorer.in_features)
        mixed = self.mixer.mix_bag(tokens, coords=None if bag_coords is None else bag_coords[order])
        return source, self.ita.aggregate(mixed, prototypes=prototypes, keys=keys[order])


class Student(nn.Module):
    """WSI-only student; ``forward`` follows the shared model-input convention (``genes``
    is accepted and ignored, so trainers can call teacher and student alike).

    ``attention[mag][u]`` (what the viewer shows as the student's tumor / TME maps) is
    a_u(i) = w_i p_i(u) / sum_j w_j p_j(u), p_i(u) the patch's membership in the clusters
    mapped to u (1 or 0 with hard assignment). This is exactly how f_u is formed: f_u = sum_i a_u(i) t_i over the mixed
    tokens t_i (= the merged token itself when K = 2). ``fusion_heads`` (one per
    magnification) is what CGC acts on; the prototypes buffer travels with checkpoints."""

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        validate_common(config)
        self.config = config
        mags = config.magnifications
        self.branches = nn.ModuleDict({m: StudentBranch(config) for m in mags})
        self.fusion_heads = nn.ModuleDict(
            {m: SubspaceFusionHead(task=config.task, d=config.d, n_outputs=config.n_outputs) for m in mags}
        )
        # (n_mags, 2, d): tumor and TME prototypes per magnification. Until distillation
        # sets them they are fixed, learning-free defaults (see ita.default_prototypes).
        self.register_buffer("prototypes", default_prototypes(config.d).expand(len(mags), 2, config.d).clone())
        self.register_buffer("prototypes_set", torch.zeros(len(mags), dtype=torch.bool))
        if config.probes:
            by_maps = config.probe_pooling == "teacher_maps"
            self.slide_probe = FrozenProbe(config.d_in * len(mags) * (3 if by_maps else 1), config.n_outputs)
            if by_maps:
                self.map_scorers = MapScorers(len(mags), config.d_in, context=config.probe_context)

    @torch.no_grad()
    def set_subspace_prototypes(self, tumor: Tensor, tme: Tensor, *, magnification: str | None = None) -> None:
        """Fix the cluster -> subspace mapping from the teacher (e.g. the running means of
        its layer-normalised f_T and f_E), for one magnification or all of them."""
        d = self.config.d
        if tumor.shape != (d,) or tme.shape != (d,):
            raise ModelConfigError(f"prototypes must be ({d},) each, got {tuple(tumor.shape)} and {tuple(tme.shape)}")
        mags = self.config.magnifications
        if magnification is not None and magnification not in mags:
            raise ModelConfigError(f"unknown magnification {magnification!r}; model has {list(mags)}")
        for i, mag in enumerate(mags):
            if magnification in (None, mag):
                self.prototypes[i, 0] = tumor.to(self.prototypes)
                self.prototypes[i, 1] = tme.to(self.prototypes)
                self.prototypes_set[i] = True

    @torch.no_grad()
    def swap_subspaces(self, magnification: str) -> None:
        """Rename tumor <-> TME at one magnification; every logit stays exactly the same.

        The cluster -> subspace rule is antisymmetric in the two prototypes, so swapping
        them swaps which clusters are called tumor; swapping the fusion head's tumor and TME
        weight blocks then gives each logit as before. Only the maps' names change."""
        mags = self.config.magnifications
        if magnification not in mags:
            raise ModelConfigError(f"unknown magnification {magnification!r}; model has {list(mags)}")
        i, d = mags.index(magnification), self.config.d
        self.prototypes[i] = self.prototypes[i].flip(0).clone()
        weight = self.fusion_heads[magnification].linear.weight
        weight.copy_(torch.cat([weight[:, d:], weight[:, :d]], dim=1))

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
        """``footprints`` is accepted for the shared signature: the student's coordinate
        encoding divides by each bag's own extent, so it needs no patch size.
        ``with_probes=False`` (training): the student's own logits, without its probe's."""
        cfg = self.config
        present = check_bags(bags, masks, magnifications=cfg.magnifications, d_in=cfg.d_in)
        probe_logits = None
        if cfg.probes and with_probes:
            probe_logits = self.slide_probe(self.probe_inputs(bags, masks, coords=coords, footprints=footprints))
        logits, attention, features, ita = {}, {}, {}, {}
        for mag in present:
            mag_coords = None if coords is None else coords.get(mag)
            feats, attention[mag], ita[mag] = self._magnification(mag, bags[mag], mag_coords, mask_for(masks, mag))
            features[mag] = {u: feats[:, i] for i, u in enumerate(SUBSPACES)}
            logits[mag] = self.fusion_heads[mag](features[mag]["tumor"], features[mag]["tme"])
            if probe_logits is not None:
                logits[mag] = logits[mag] + probe_logits
        combined = combine_magnifications(logits, task=cfg.task, how=cfg.combine)
        output = ModelOutput(
            logits=combined, per_magnification_logits=logits, attention=attention, features=features, ita=ita
        )
        return output.fill_derived(self.fusion_heads[present[0]].describe(combined))

    def probe_inputs(self, bags: dict[str, Tensor], masks: dict[str, Tensor] | None, *,
                     coords: dict[str, Tensor] | None = None, footprints: dict[str, Tensor] | None = None) -> Tensor:
        """What the frozen slide probe reads: (B, M x D) mean patch features, then with
        ``probe_pooling`` "teacher_maps" (B, M x 2 x D) features pooled by the map scores."""
        mags, fill = self.config.magnifications, self.slide_probe.mean
        width = self.config.d_in * len(mags)
        mean = pooled_magnifications(bags, masks, mags, fill[:width])
        if getattr(self, "map_scorers", None) is None:
            return mean
        pooled = self.map_scorers(bags, masks, mags, fill[width:], coords=coords,
                                  steps=self.footprint_steps(bags, footprints))
        return torch.cat([mean, pooled], dim=-1)

    def footprint_steps(self, bags: dict[str, Tensor], footprints: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """Per magnification, (B,) each bag's patch footprint in level-0 pixels (its file's,
        else ``patch_size_10x_level0`` scaled to the magnification)."""
        size10 = self.config.patch_size_10x_level0
        return {mag: bag_steps(footprints, mag, batch=x.shape[0], device=x.device,
                               default=size10 * 10.0 / magnification_number(mag)) for mag, x in bags.items()}

    def _magnification(
        self, mag: str, x: Tensor, coords: Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor], ITAResult]:
        """Run every bag of one magnification; scatter per-patch results back to (B, N)."""
        bsz, n_max, _ = x.shape
        if coords is not None and coords.shape[:2] != (bsz, n_max):
            raise DataError(f"coords {mag!r} must be ({bsz}, {n_max}, 2), got {tuple(coords.shape)}")
        prototypes = self.prototypes[self.config.magnifications.index(mag)]
        dev = x.device
        cluster = torch.full((bsz, n_max), -1, dtype=torch.long, device=dev)
        is_centre = torch.zeros(bsz, n_max, dtype=torch.bool, device=dev)
        weight_rows, attn_rows, merged, subspace, feats = [], [], [], [], []
        for b in range(bsz):
            valid = torch.arange(n_max, device=dev) if mask is None else mask[b].nonzero().squeeze(1)
            source, bag = self.branches[mag].run_bag(
                x[b], valid=valid, coords=None if coords is None else coords[b], prototypes=prototypes
            )
            cluster[b, source] = bag.cluster
            is_centre[b, source] = bag.is_centre
            weight_rows.append(bag.weight.new_zeros(n_max).index_copy(0, source, bag.weight))
            attn_rows.append(bag.attention.new_zeros(2, n_max).index_copy(1, source, bag.attention))
            merged.append(bag.merged)
            subspace.append(bag.subspace)
            feats.append(bag.features)
        attention = torch.stack(attn_rows)  # (B, 2, N)
        result = ITAResult(
            cluster=cluster, is_centre=is_centre, weight=torch.stack(weight_rows),
            merged=torch.stack(merged), subspace=torch.stack(subspace),
        )
        return torch.stack(feats), {u: attention[:, i] for i, u in enumerate(SUBSPACES)}, result
