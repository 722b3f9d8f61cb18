"""MIRROR: slide and RNA encoders pretrained without labels, then a linear probe.

Pretraining (:meth:`Mirror.pretrain_losses`) aligns the slide [CLS] embedding with the
RNA embedding (CLIP), retains modality detail (masked latent reconstruction per modality)
and shares a style-clustering module between the modalities; weights and defaults follow
METHOD.md section 2 (0.5 / 0.15 / 0.15 / 0.1 / 0.1, temperature 1/0.07 clamped at 100,
mask ratio 0.75, 128-d latent).

Prediction (:meth:`Mirror.forward`) is WSI only and follows the shared model interface:
the slide embedding (mean of the magnifications' [CLS]), standardised with training-fold
statistics (buffers), goes through ``head``, a Linear the probe fits on frozen
embeddings (logistic regression coefficients, or a discrete-time survival head). Its
single attention map is ``attention[mag]["cls"]``: the last layer's [CLS] row over the
patches, averaged over heads (it sums to 1 over the patches of each bag).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_dismm.errors import DataError, ModelConfigError
from napari_dismm.model.config import validate_common
from napari_dismm.model.heads import TaskHead
from napari_dismm.model.inputs import bag_steps, check_bags, mask_for
from napari_dismm.model.mirror.encoders import RNAEncoder, SlideEncoder
from napari_dismm.model.mirror.losses import (
    alignment_loss,
    balanced_labels,
    gaussian_kl,
    retention_loss,
    swapped_prediction_loss,
    symmetric_kl,
)
from napari_dismm.model.mixing import CoordinateEncoding, MixingBlock, normalise_coords
from napari_dismm.model.outputs import ModelOutput

__all__ = ["Mirror", "MirrorConfig", "StyleClustering"]

LOSS_NAMES = ("align", "ret_wsi", "ret_rna", "style", "cluster")


@dataclass
class MirrorConfig:
    """Architecture and pretraining weights of a MIRROR model.

    ``d`` is the token width (reference 768; 128 here, as for DisMM, since our patch
    features and cohorts are smaller). ``n_prototypes``: reference 3000; a cohort of a few
    dozen patients uses far fewer in practice, which is why it is a parameter.
    ``n_outputs`` / ``task`` describe the probe head that prediction uses."""

    kind: str = "mirror"
    task: str = "classification"
    n_outputs: int = 4
    d_in: int = 1024
    d: int = 128
    magnifications: tuple[str, ...] = ("20x",)
    n_genes: int = 2000
    n_layers: int = 2
    n_heads: int = 4
    rna_tokens: int = 8
    rna_layers: int = 2
    d_latent: int = 128
    n_prototypes: int = 3000
    cluster_temperature: float = 0.1
    mask_ratio: float = 0.75
    dropout: float = 0.1
    chunk_size: int = 16384
    temperature_init: float = 0.07
    max_logit_scale: float = 100.0
    w_align: float = 0.5
    w_ret_wsi: float = 0.15
    w_ret_rna: float = 0.15
    w_style: float = 0.1
    w_cluster: float = 0.1
    balance_weight: float = 1.0
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iters: int = 3

    def __post_init__(self) -> None:
        self.magnifications = tuple(self.magnifications)
        validate_common(self)
        if self.kind != "mirror":
            raise ModelConfigError(f"MirrorConfig.kind must be 'mirror', got {self.kind!r}")
        checks = {
            "n_genes": self.n_genes >= 1, "n_layers": self.n_layers >= 1, "rna_tokens": self.rna_tokens >= 1,
            "rna_layers": self.rna_layers >= 0, "n_heads": self.n_heads >= 1 and self.d % self.n_heads == 0,
            "d_latent": self.d_latent >= 1, "n_prototypes": self.n_prototypes >= 2,
            "cluster_temperature": self.cluster_temperature > 0, "mask_ratio": 0.0 < self.mask_ratio < 1.0,
            "chunk_size": self.chunk_size >= 1, "temperature_init": self.temperature_init > 0,
            "max_logit_scale": self.max_logit_scale >= 1.0 / self.temperature_init,
            **{f"w_{n}": getattr(self, f"w_{n}") >= 0 for n in LOSS_NAMES},
            "balance_weight": self.balance_weight >= 0, "sinkhorn_epsilon": self.sinkhorn_epsilon > 0,
            "sinkhorn_iters": self.sinkhorn_iters >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ModelConfigError(f"invalid MirrorConfig value(s) for {', '.join(bad)}")


class StyleClustering(nn.Module):
    """Shared by both modalities: embedding -> diagonal Gaussian (mu, log-var) -> sample ->
    decode -> cosine scores against prototypes (normalised on every call); the assignment
    is softmax(scores / temperature). In eval mode the mean is used instead of a sample.
    ``forward`` returns (mu, logvar, scores): the balance term needs the raw scores."""

    def __init__(self, *, d: int, d_latent: int, n_prototypes: int, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature
        # no biases on the mean's path: the KL term shrinks the posterior means towards 0, and
        # with biases decode(mu) then tends to one shared vector (measured: cosine 0.98-1.00
        # between slides, one prototype for all); without them the cosine scores depend on
        # the direction of mu only, which the shrinkage leaves alone
        self.to_gaussian = nn.Linear(d, 2 * d_latent, bias=False)
        self.decode = nn.Sequential(nn.Linear(d_latent, d, bias=False), nn.GELU(), nn.Linear(d, d, bias=False))
        self.prototypes = nn.Parameter(torch.randn(n_prototypes, d))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.to_gaussian(z).chunk(2, dim=-1)
        logvar = logvar.clamp(-10.0, 10.0)
        sample = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return mu, logvar, self.scores(sample)

    def scores(self, latent: Tensor) -> Tensor:
        """Cosine scores (B, K) of latents against the prototypes."""
        return F.normalize(self.decode(latent), dim=-1) @ F.normalize(self.prototypes, dim=-1).T

    def assign(self, scores: Tensor) -> Tensor:
        return (scores / self.temperature).softmax(dim=-1)


class RetentionDecoder(nn.Module):
    """Light decoder of masked slide tokens: visible tokens + a mask token where hidden,
    plus an MLP of the real coordinates (so it knows *where* to reconstruct), one
    linear-cost attention block, a Linear."""

    def __init__(self, d: int, *, n_heads: int, chunk_size: int) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.position = CoordinateEncoding(d)
        self.block = MixingBlock(d, n_heads=n_heads, ffn_mult=2, chunk_size=chunk_size)
        self.out = nn.Linear(d, d)

    def forward(self, tokens: Tensor, coords: Tensor, masked: Tensor) -> Tensor:
        x = torch.where(masked[:, None], self.mask_token.to(tokens.dtype), tokens)
        x = x + self.position(normalise_coords(coords).to(tokens.dtype))
        return self.out(self.block(x))


def _steps(footprints: dict[str, Tensor] | None, mag: str, batch: int) -> list[float | None]:
    """Each bag's footprint at ``mag`` (None where not given: the lattice is read off the
    coordinates, as before footprints were passed)."""
    steps = bag_steps(footprints, mag, batch=batch, default=float("nan"))
    return [None if not math.isfinite(v) else v for v in steps.tolist()]


class Mirror(nn.Module):
    """MIRROR slide + RNA encoders with the pretraining heads and a probe head."""

    def __init__(self, config: MirrorConfig) -> None:
        super().__init__()
        validate_common(config)
        self.config = config
        cfg = config
        self.slide = nn.ModuleDict({
            m: SlideEncoder(d_in=cfg.d_in, d=cfg.d, n_layers=cfg.n_layers, n_heads=cfg.n_heads, dropout=cfg.dropout,
                            chunk_size=cfg.chunk_size)
            for m in cfg.magnifications
        })
        self.rna = RNAEncoder(n_genes=cfg.n_genes, d=cfg.d, n_tokens=cfg.rna_tokens, n_layers=cfg.rna_layers,
                              n_heads=cfg.n_heads, dropout=cfg.dropout)
        self.proj_slide = nn.Linear(cfg.d, cfg.d)
        self.proj_rna = nn.Linear(cfg.d, cfg.d)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature_init)))
        self.slide_decoders = nn.ModuleDict(
            {m: RetentionDecoder(cfg.d, n_heads=cfg.n_heads, chunk_size=cfg.chunk_size) for m in cfg.magnifications}
        )
        self.rna_decoder = nn.Sequential(nn.Linear(cfg.d, cfg.d), nn.GELU(), nn.Linear(cfg.d, cfg.n_genes))
        self.style = StyleClustering(d=cfg.d, d_latent=cfg.d_latent, n_prototypes=cfg.n_prototypes,
                                     temperature=cfg.cluster_temperature)
        # the probe: standardise the frozen embedding with training-fold statistics, then Linear
        self.register_buffer("feature_mean", torch.zeros(cfg.d))
        self.register_buffer("feature_std", torch.ones(cfg.d))
        self.head = TaskHead(task=cfg.task, in_features=cfg.d, n_outputs=cfg.n_outputs)

    # -- encoders -----------------------------------------------------------------------

    def scale(self) -> Tensor:
        """The CLIP logit scale exp(t), clamped at ``max_logit_scale`` (reference 100)."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def encode_slides(
        self, bags: dict[str, Tensor], *, coords: dict[str, Tensor] | None = None,
        masks: dict[str, Tensor] | None = None, return_attention: bool = False,
        footprints: dict[str, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per magnification: [CLS] (B, d) and, if asked, attention (B, N) (0 on padding).
        ``footprints[mag]`` (B,): each bag's patch side in level-0 px, the step of the
        positional convolution's lattice (absent or NaN: read off the coordinates)."""
        cfg = self.config
        present = check_bags(bags, masks, magnifications=cfg.magnifications, d_in=cfg.d_in)
        cls, attention = {}, {}
        for mag in present:
            x = bags[mag]
            bsz, n_max, _ = x.shape
            mask = mask_for(masks, mag)
            xy = self._coords(coords, mag, x)
            steps = _steps(footprints, mag, bsz)
            rows, maps = [], []
            for b in range(bsz):
                keep = torch.arange(n_max, device=x.device) if mask is None else mask[b].nonzero().squeeze(1)
                c, _, a = self.slide[mag](x[b].index_select(0, keep), xy[b].index_select(0, keep),
                                          return_attention=return_attention, step=steps[b])
                rows.append(c)
                if a is not None:
                    maps.append(a.new_zeros(n_max).index_copy(0, keep, a))
            cls[mag] = torch.stack(rows)
            if return_attention:
                attention[mag] = torch.stack(maps)
        return cls, attention

    def embed(self, bags: dict[str, Tensor], *, coords: dict[str, Tensor] | None = None,
              masks: dict[str, Tensor] | None = None, footprints: dict[str, Tensor] | None = None) -> Tensor:
        """The slide embedding (B, d): mean of the magnifications' [CLS] (what probes read)."""
        cls, _ = self.encode_slides(bags, coords=coords, masks=masks, footprints=footprints)
        return torch.stack(list(cls.values())).mean(dim=0)

    @staticmethod
    def _coords(coords: dict[str, Tensor] | None, mag: str, x: Tensor) -> Tensor:
        """Coordinates are required: the positional convolution needs the real lattice."""
        if coords is None or coords.get(mag) is None:
            raise DataError(f"MIRROR needs patch coordinates for {mag!r} (its positional encoding uses them)")
        if coords[mag].shape != (*x.shape[:2], 2):
            raise DataError(f"coords {mag!r} must be {(*x.shape[:2], 2)}, got {tuple(coords[mag].shape)}")
        return coords[mag]

    # -- prediction -----------------------------------------------------------------------

    def probe_logits(self, embedding: Tensor) -> Tensor:
        return self.head((embedding - self.feature_mean) / self.feature_std)

    def forward(
        self, bags: dict[str, Tensor], *, coords: dict[str, Tensor] | None = None,
        masks: dict[str, Tensor] | None = None, genes: dict[str, Tensor] | None = None,
        footprints: dict[str, Tensor] | None = None,
    ) -> ModelOutput:
        """WSI only (``genes`` accepted and ignored, as the student does)."""
        cls, attention = self.encode_slides(bags, coords=coords, masks=masks, return_attention=True,
                                            footprints=footprints)
        per_mag = {m: self.probe_logits(c) for m, c in cls.items()}
        logits = self.probe_logits(torch.stack(list(cls.values())).mean(dim=0))
        output = ModelOutput(
            logits=logits, per_magnification_logits=per_mag,
            attention={m: {"cls": a} for m, a in attention.items()},
            features={m: {"cls": c} for m, c in cls.items()},
        )
        return output.fill_derived(self.head.describe(logits))

    # -- pretraining ----------------------------------------------------------------------

    def pretrain_losses(
        self, bags: dict[str, Tensor], *, genes: Tensor, coords: dict[str, Tensor],
        masks: dict[str, Tensor] | None = None, footprints: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted total, parts) for a batch of slides and their patients' gene vectors
        (B, n_genes). Masks are drawn from torch's global generator (seed it to repeat)."""
        cfg = self.config
        present = check_bags(bags, masks, magnifications=cfg.magnifications, d_in=cfg.d_in)
        bsz = bags[present[0]].shape[0]
        if genes.ndim != 2 or genes.shape != (bsz, cfg.n_genes):
            raise DataError(f"genes must be ({bsz}, {cfg.n_genes}), got {tuple(genes.shape)}")
        cls_rows, retained = [], []
        for mag in present:
            x, mask = bags[mag], mask_for(masks, mag)
            xy = self._coords(coords, mag, x)
            steps = _steps(footprints, mag, bsz)
            rows = []
            for b in range(bsz):
                keep = torch.arange(x.shape[1], device=x.device) if mask is None else mask[b].nonzero().squeeze(1)
                bag_xy = xy[b].index_select(0, keep)
                c, tokens, _ = self.slide[mag](x[b].index_select(0, keep), bag_xy, step=steps[b])
                rows.append(c)
                hidden = self._token_mask(tokens.shape[0], tokens.device)
                pred = self.slide_decoders[mag](tokens, bag_xy, hidden)
                retained.append(retention_loss(pred, tokens, hidden))
            cls_rows.append(torch.stack(rows))
        slide = torch.stack(cls_rows).mean(dim=0)
        rna = self.rna(genes)
        gene_hidden = torch.rand(genes.shape, device=genes.device) < cfg.mask_ratio
        rna_pred = self.rna_decoder(self.rna(genes.masked_fill(gene_hidden, 0.0)))  # 0 = training mean
        z_slide, z_rna = F.normalize(self.proj_slide(slide), dim=-1), F.normalize(self.proj_rna(rna), dim=-1)
        mu_s, lv_s, s_s = self.style(z_slide)
        mu_r, lv_r, s_r = self.style(z_rna)
        p_s, p_r = self.style.assign(s_s), self.style.assign(s_r)
        # balance (Decision): each modality's assignment is trained towards the other's
        # Sinkhorn-balanced target (SwAV's swapped prediction), both on the posterior *means*,
        # the path eval uses. On samples, the unit posterior noise the KL term keeps swamps
        # the differences between slides: no assignment can predict the other modality's
        # noise, so the best reply is one assignment for every slide (measured: a collapse).
        # Targets are rounded to the plan's argmax (soft targets measured: entropy 0.95 of
        # log K, yet one flat assignment shared by all slides, which soft targets allow)
        m_s, m_r = self.style.scores(mu_s), self.style.scores(mu_r)
        with torch.no_grad():
            q_s, q_r = (balanced_labels(m, epsilon=cfg.sinkhorn_epsilon, n_iters=cfg.sinkhorn_iters) for m in (m_s, m_r))
        t = self.style.temperature
        parts = {
            "align": alignment_loss(z_slide, z_rna, scale=self.scale()),
            "ret_wsi": torch.stack(retained).mean(),
            "ret_rna": retention_loss(rna_pred, genes, gene_hidden),
            "style": 0.5 * (gaussian_kl(mu_s, lv_s) + gaussian_kl(mu_r, lv_r)),
            "cluster": symmetric_kl(p_s, p_r) + cfg.balance_weight * swapped_prediction_loss(m_s / t, m_r / t, q_s, q_r),
        }
        total = sum(getattr(cfg, f"w_{name}") * value for name, value in parts.items())
        return total, parts

    def _token_mask(self, n: int, device: torch.device) -> Tensor:
        """Hide round(mask_ratio * n) tokens (at least one, at most n - 1 when n > 1)."""
        k = min(max(1, round(self.config.mask_ratio * n)), max(n - 1, 1))
        hidden = torch.zeros(n, dtype=torch.bool, device=device)
        hidden[torch.randperm(n, device=device)[:k]] = True
        return hidden if n > 1 else torch.zeros_like(hidden)

    @torch.no_grad()
    def assignments(self, embedding: Tensor, *, modality: str = "slide") -> Tensor:
        """Prototype assignment (B, K) of slide or RNA embeddings (eval: posterior means)."""
        proj = self.proj_slide if modality == "slide" else self.proj_rna
        was = self.style.training
        self.style.eval()
        _, _, scores = self.style(F.normalize(proj(embedding), dim=-1))
        self.style.train(was)
        return self.style.assign(scores)
