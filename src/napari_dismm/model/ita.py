"""Informative token aggregation (ITA): merge a bag's patch tokens into K tokens.

Each token gets a weight w = exp(score) from a Linear scorer. K cluster centres are
chosen by DPC-kNN (density peaks with a k-nearest-neighbour density): density
rho_i = exp(-mean squared distance to its k nearest neighbours), delta_i = distance to
the nearest denser token (the densest gets the largest distance), centre score =
rho * delta, top K. Every token joins its nearest centre and each merged token is the
w-weighted mean of its cluster.

The reference builds the full N x N distance matrix (160 GB at 200k tokens). Here the
centres are chosen by exact DPC-kNN on an **anchor sample** (``candidates="anchors"``,
format 4 on): the first M tokens in key order (``permutation_keys`` hashes each token's
content, so this is a uniform random sample that any permutation of the bag draws
alike), M = ``n_anchors`` (2048 by default). Density, delta and score are computed among
the anchors only (O(M^2) time and memory, whatever N); then every token joins its nearest
centre (O(N K), chunked). Why a sample and not the densest tokens:

- A large mode cannot be missed. A mode holding a share f of the bag has about f M
  anchors (at f = 1 %, 20 of 2048; missing it entirely has probability (1 - f)^M, 1e-9),
  so its own density peak is among the candidates with its true delta (the distance to
  the other mode). The former rule (``"densest"``, models of format <= 3: density of every
  token against the anchors, centres among the C = 1024 densest of all N tokens) put all
  C candidates in the single densest mode once N >> C: two modes of 45 % and 35 % were
  both found at 3k tokens and one of them was lost at 30k and 100k
  (tests/model/test_ita_scale.py).
- The same clustering in training and at inference. The student trains on subsets of at
  most ``max_patches`` (4096) tokens and predicts on whole bags of up to 100k+: both run
  DPC-kNN on M tokens drawn alike from the same distribution, at the same kNN bandwidth;
  with the densest-C rule the candidates were the top C/N of the bag, a share that
  shrank 25-fold from training to inference.
- Exact where it fits: with N <= M every token is an anchor and this is DPC-kNN itself.
  On two-mode bags of 3k-5k tokens (with a diffuse background of 20 %) the partition
  agrees with exact DPC-kNN's on every mode token (adjusted Rand 1.00) and 0.78-1.00 on
  all tokens (the background between the modes is split where the centres fall).
- Deterministic: no generator is needed, the sample is a function of the bag's content.

Hard or soft merging (``assignment``). The reference merges each cluster's tokens with a
hard nearest-centre assignment, so no gradient tells a token which cluster it should
join: on tokens where tissue type is not the largest source of variance, the two
clusters follow noise and the subspace maps cannot localise. With ``"soft"`` (the
default for new models) every token belongs to every centre with a membership
p_ik = softmax_k(-d_ik / (tau s)), d_ik its scaled squared distance to centre k and s a
unit that follows the tokens' scale (no gradient), and merged token k is the (w p_k)-weighted
mean; gradients then move tokens between clusters. The cluster id shown in the viewer
stays the nearest centre (the membership's argmax). ``"hard"`` is the reference, and how
models saved before format 2 were trained. The unit s (``membership_scale``):
``"spread"`` (the default, and every model before format 4) is the spread of all
distances, which grows with the separation itself, so a patch never gets more than ~0.73
of its own cluster at tau = 2 however far apart the modes are; ``"width"`` is the
clusters' own width, so memberships sharpen to hard as the clusters separate and stay
soft while they overlap. Measured on the planted cohort (test_planted, held-out student
tumor / TME maps): spread at tau 2 0.798 / 0.826; width at tau 1 / 2 / 4 0.672 / 0.692,
0.755 / 0.790, 0.778 / 0.822; hard 0.580 / 0.619. Sharper memberships pass less gradient
between the clusters, and the maps learn less: the default stays "spread" at tau 2
(``soft_membership``; figures in benchmarks/bench_ita.py and the README).

Everything is decided in a canonical order that depends only on the tokens themselves
(``permutation_keys``: a hash of the coordinates and of the raw feature bits), and ties
are broken by that order, so permuting the patches permutes the assignments and
changes nothing else. Cluster ids are ordered by centre score (0 = best). Selection is
discrete and runs under no_grad; gradients flow through w and the tokens into the
merged tokens. Distances are scaled by 1/sqrt(d) so the density does not vanish in
high dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from napari_dismm.model.outputs import ITAResult

__all__ = [
    "BagAggregation",
    "InformativeTokenAggregation",
    "assign_to_centres",
    "default_prototypes",
    "dpc_knn_centres",
    "map_to_subspaces",
    "merge_soft",
    "merge_tokens",
    "permutation_keys",
    "soft_membership",
    "subspace_pool",
]

ASSIGNMENTS = ("hard", "soft")
CANDIDATES = ("anchors", "densest")
MEMBERSHIP_SCALES = ("width", "spread")

_MASK_31 = (1 << 31) - 1
_C1 = 0x9E3779B97F4A7C15 - (1 << 64)  # splitmix64 constants as signed int64
_C2 = 0xBF58476D1CE4E5B9 - (1 << 64)
_C3 = 0x94D049BB133111EB - (1 << 64)


def _mix64(z: Tensor) -> Tensor:
    """A splitmix64-style integer finaliser on int64 (wrapping arithmetic); the shifted
    value is masked so the result does not depend on arithmetic vs logical shifts."""
    z = (z + _C1) * _C2
    z = z ^ ((z >> 31) & ((1 << 33) - 1))
    z = z * _C3
    return z ^ ((z >> 29) & ((1 << 35) - 1))


def permutation_keys(*, features: Tensor, coords: Tensor | None = None, n_columns: int = 16) -> Tensor:
    """(n,) int64 keys that depend on each token's own content only, never on its index.

    Hashes the exact bits of the first ``n_columns`` feature values and, if given, the
    rounded coordinates. Sorting by key gives an order that is the same for any
    permutation of the bag (identical tokens aside) and looks random over the slide, so
    the first M tokens in key order are an unbiased, reproducible anchor sample."""
    if features.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=features.device)
    cols = features[:, : min(n_columns, features.shape[-1])].to(torch.float32).contiguous()
    parts = [cols.view(torch.int32).to(torch.int64) & ((1 << 32) - 1)]
    if coords is not None:
        parts.append(torch.round(coords.to(torch.float64)).to(torch.int64) & _MASK_31)
    words = torch.cat(parts, dim=1)  # (n, w) non-negative 32-bit words
    # one multiply-add pass with odd per-column multipliers, then one strong finaliser
    multipliers = _mix64(torch.arange(1, words.shape[1] + 1, dtype=torch.int64, device=words.device)) | 1
    return _mix64((words * multipliers).sum(dim=1))


def _scaled_sq_dist(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances / d between rows of a (n, d) and b (m, d), >= 0."""
    d2 = (a * a).sum(-1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(-1)[None, :]
    return d2.clamp_min_(0.0) / a.shape[-1]


def _knn_log_density(x: Tensor, anchors: Tensor, *, knn: int, chunk_size: int) -> Tensor:
    """log rho_i = -mean of the knn smallest scaled squared distances to other anchors.

    One GEMM per chunk gives |b|^2 - 2 a.b directly (the anchors carry an extra column
    |b|^2 matched by a column of ones), and |a|^2, constant along a row, is added to the
    knn winners only: the ranking does not need it."""
    n, m = x.shape[0], anchors.shape[0]
    anchor_pos = torch.full((n,), -1, dtype=torch.long, device=x.device)
    anchor_pos[anchors] = torch.arange(m, device=x.device)
    ref = x[anchors]
    ref_aug = torch.cat([-2.0 * ref, (ref * ref).sum(-1, keepdim=True)], dim=1).T.contiguous()  # (d+1, m)
    k_eff = max(1, min(knn, m - 1))
    log_rho = x.new_empty(n)
    ones = x.new_ones(min(n, chunk_size), 1)
    for start in range(0, n, chunk_size):
        part = x[start : start + chunk_size]
        partial = torch.cat([part, ones[: part.shape[0]]], dim=1) @ ref_aug
        own = anchor_pos[start : start + chunk_size]
        is_anchor = (own >= 0).nonzero().squeeze(1)
        if m > 1:  # leave out the distance of an anchor to itself
            partial[is_anchor, own[is_anchor]] = torch.inf
        nearest = partial.topk(k_eff, dim=1, largest=False, sorted=False).values
        d2 = (nearest + (part * part).sum(-1, keepdim=True)).clamp_min_(0.0)
        log_rho[start : start + chunk_size] = -d2.mean(dim=1) / x.shape[-1]
    return log_rho


def _is_sorted(keys: Tensor) -> bool:
    return keys.shape[0] < 2 or bool((keys[1:] >= keys[:-1]).all())


def _key_order(keys: Tensor) -> Tensor:
    """Stable argsort of the keys; free when they are already sorted (the student's case)."""
    if _is_sorted(keys):
        return torch.arange(keys.shape[0], device=keys.device)
    return torch.sort(keys, stable=True).indices


def _peaks(x: Tensor, log_rho: Tensor, *, k: int) -> Tensor:
    """Positions (min(k, c),) of the DPC centres among c tokens already in density order
    (densest first): delta = distance to the nearest earlier (denser) token, the densest
    gets the largest distance; score = log rho + log delta, ties to the denser token."""
    c = x.shape[0]
    dist = _scaled_sq_dist(x, x).sqrt_()
    denser = torch.ones(c, c, dtype=torch.bool, device=x.device).tril_(-1)  # j < i is denser
    delta = dist.masked_fill(~denser, torch.inf).amin(dim=1)
    delta[0] = dist.amax() if c > 1 else 1.0
    score = log_rho + torch.log(delta.clamp_min(torch.finfo(x.dtype).tiny))
    return torch.sort(score, descending=True, stable=True).indices[: min(k, c)]


@torch.no_grad()
def dpc_knn_centres(
    x: Tensor,
    *,
    k: int,
    knn: int = 5,
    n_anchors: int = 2048,
    n_candidates: int = 1024,
    keys: Tensor | None = None,
    chunk_size: int = 8192,
    candidates: str = "anchors",
) -> Tensor:
    """Indices (min(k, n),) of the DPC-kNN centres of x (n, d), best centre first.

    ``candidates="anchors"``: DPC-kNN on the anchor sample alone (the first ``n_anchors``
    tokens in key order; O(M^2) for M anchors, nothing grows with n). ``"densest"`` (models
    of format <= 3): density of every token against the anchors, centres among the
    ``n_candidates`` densest tokens. Ties in density go to the smaller key, ties in centre
    score to the denser token; so the result (as a set of tokens, and its order) does not
    depend on the row order."""
    if candidates not in CANDIDATES:
        raise ValueError(f"unknown ITA candidate rule {candidates!r}; expected one of {CANDIDATES}")
    x = x.detach().to(torch.float32)
    n = x.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    if keys is None:
        keys = permutation_keys(features=x)
    canonical = _key_order(keys)
    anchors = canonical[: min(n, n_anchors)]
    if candidates == "anchors":
        log_rho = _knn_log_density(x[anchors], torch.arange(anchors.shape[0], device=x.device), knn=knn,
                                   chunk_size=chunk_size)
        cand_rho, by_density = torch.sort(log_rho, descending=True, stable=True)  # ties: anchors are in key order
        cand = anchors[by_density]
    else:
        log_rho = _knn_log_density(x, anchors, knn=knn, chunk_size=chunk_size)
        # density order: rho descending, then canonical (key) order
        by_density = canonical[torch.sort(log_rho[canonical], descending=True, stable=True).indices]
        cand = by_density[: min(n, n_candidates)]
        cand_rho = log_rho[cand]
    return cand[_peaks(x[cand], cand_rho, k=k)]


@torch.no_grad()
def assign_to_centres(x: Tensor, centres: Tensor, *, chunk_size: int = 65536) -> Tensor:
    """(n,) cluster id of each token = position of its nearest centre (first on ties);
    a centre always belongs to its own cluster."""
    x = x.detach().to(torch.float32)
    if centres.numel() == 0:
        return torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    ref = x[centres]
    parts = [_scaled_sq_dist(part, ref).argmin(dim=1) for part in x.split(chunk_size, dim=0)]
    cluster = torch.cat(parts)
    cluster[centres] = torch.arange(centres.shape[0], device=x.device)
    return cluster


def _spread_unit(d2: Tensor) -> Tensor:
    """Format <= 3 (``"spread"``): the spread of each token's distances around its mean
    distance. Scale-free in the centres' separation: at a given temperature a typical
    token gets the same membership however far apart the clusters are."""
    return (d2 - d2.mean(dim=1, keepdim=True)).std(correction=0)


def _width_unit(d2: Tensor) -> Tensor:
    """``"width"``: the clusters' own width, the pooled within-cluster standard deviation
    of the distance gaps g_ik = d2_ik - d2_ia (token i of cluster a, i.e. nearest centre a,
    and each other centre k). A token's log-odds of its own cluster over k is then its gap
    in units of that width (/ temperature): tokens sharpen to their cluster as the clusters
    separate (the gaps grow with the centres' distance, the width only with the clusters'
    own spread), and a mode cut in two stays soft (its halves' gaps are about as wide as
    they are large: about 0.8 of the own cluster at temperature 1). Unlike a
    Gaussian-mixture posterior at the centres it does not mistake two far-apart centre
    *tokens* (in high dimension any two tokens are far apart) for two far-apart modes.
    Clusters of one token say nothing and are left out (0 when nothing is left: hard)."""
    n, k = d2.shape
    g64 = d2.double()
    nearest = g64.argmin(dim=1)
    onehot = nn.functional.one_hot(nearest, k).double()  # (n, K)
    counts = onehot.sum(dim=0)  # (K,)
    gap = g64 - g64.gather(1, nearest[:, None])  # (n, K), >= 0
    mean = (onehot.T @ gap) / counts.clamp_min(1)[:, None]  # (K, K): [a, k] over the tokens of a
    var = (onehot.T @ (gap - mean[nearest]) ** 2) / counts.clamp_min(1)[:, None]
    valid = (counts[:, None] >= 2) & ~torch.eye(k, dtype=torch.bool, device=d2.device)
    if not valid.any():
        return d2.new_zeros(())
    weights = counts[:, None].expand(k, k)[valid]
    return ((var[valid] * weights).sum() / weights.sum()).sqrt().to(d2.dtype)


def soft_membership(x: Tensor, centres: Tensor, *, temperature: float, scale: str = "spread") -> Tensor:
    """(n, K) membership of each token in each centre's cluster, rows summing to 1:
    p_ik = softmax_k(-d2_ik / (temperature * unit)), d2 the scaled squared distances.

    ``scale`` sets the unit (no gradient flows through it, and it scales with the tokens,
    so the memberships do not depend on the token scale): ``"width"`` the clusters' own
    width, so memberships sharpen towards the nearest centre as the clusters separate;
    ``"spread"`` (the default) the spread of the distances, which keeps a typical patch at
    the same membership whatever the separation (about 0.73 of its own cluster at
    temperature 2).
    Differentiable in x (the centres are tokens too). Nothing of size (n, d) beyond x."""
    if scale not in MEMBERSHIP_SCALES:
        raise ValueError(f"unknown membership scale {scale!r}; expected one of {MEMBERSHIP_SCALES}")
    ref = x[centres]
    sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True) ** 2
    d2 = (sq - 2.0 * x @ ref.T + (ref * ref).sum(-1)[None, :]).clamp_min(0.0) / x.shape[-1]
    if centres.shape[0] < 2:
        return torch.ones_like(d2)
    with torch.no_grad():
        free = d2.detach()
        unit = _spread_unit(free) if scale == "spread" else _width_unit(free)
        # a floor that keeps -d2 / unit finite (hard memberships when the clusters have no width)
        unit = unit.clamp_min(1e-6 * float(free.mean())).clamp_min(torch.finfo(d2.dtype).tiny)
    return torch.softmax(-d2 / (temperature * unit), dim=1)


def merge_soft(x: Tensor, weight: Tensor, membership: Tensor) -> tuple[Tensor, Tensor]:
    """Merged tokens (K, d) = (w p_k)-weighted means, and cluster totals W_k = sum_i w_i p_ik."""
    mass = weight[:, None] * membership  # (n, K)
    totals = mass.sum(dim=0)
    return (mass.T @ x) / totals.clamp_min(torch.finfo(totals.dtype).tiny)[:, None], totals


def merge_tokens(x: Tensor, weight: Tensor, cluster: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Merged tokens (k, d) = w-weighted cluster means, and cluster totals W (k,).

    Differentiable in x and weight; an empty cluster gives a zero token and W = 0."""
    total = weight.new_zeros(k).index_add(0, cluster, weight)
    summed = x.new_zeros(k, x.shape[-1]).index_add(0, cluster, x * weight[:, None])
    return summed / total.clamp_min(torch.finfo(total.dtype).tiny)[:, None], total


def default_prototypes(d: int) -> Tensor:
    """(2, d) fixed prototypes used before distillation sets real ones: a seeded random
    unit vector for tumor and its negation for TME (no learning, reproducible)."""
    gen = torch.Generator().manual_seed(20240601)
    tumor = torch.randn(d, generator=gen)
    tumor = tumor / tumor.norm()
    return torch.stack([tumor, -tumor])


@torch.no_grad()
def map_to_subspaces(merged: Tensor, prototypes: Tensor) -> Tensor:
    """(k,) subspace of each merged token: 0 = tumor, 1 = TME.

    c = cos(token, tumor) - cos(token, TME). The token with the largest c is tumor and
    (for k >= 2) a different token with the smallest c is TME, so both subspaces are
    always filled; the rest follow the sign of c. With k = 2 this is the one-to-one
    rule. Ties go to the lower cluster id."""
    merged = merged.detach().to(torch.float32)
    protos = prototypes.detach().to(torch.float32)
    cos = nn.functional.cosine_similarity(merged[:, None, :], protos[None, :, :], dim=-1)
    c = cos[:, 0] - cos[:, 1]
    subspace = (c < 0).to(torch.long)
    if merged.shape[0] >= 2:
        order = torch.sort(c, descending=True, stable=True).indices
        subspace[order[0]] = 0
        subspace[order[-1]] = 1
    elif merged.shape[0] == 1:
        subspace[0] = 0 if c[0] >= 0 else 1
    return subspace


def subspace_pool(
    merged: Tensor, totals: Tensor, subspace: Tensor, weight: Tensor, membership: Tensor
) -> tuple[Tensor, Tensor]:
    """Subspace features (2, d) and per-patch attention (2, n).

    ``membership`` is (n,) hard cluster ids or (n, K) soft memberships p_ik.
    f_u = sum over clusters mapped to u of W_k * merged_k / sum W_k, which equals
    sum_i a_u(i) x_i with a_u(i) = w_i * (sum_{k of u} p_ik) / sum_{k of u} W_k (p one-hot
    when hard: w_i / sum_{j in clusters of u} w_j for patches whose cluster maps to u,
    else 0): the attention map *is* the pooling that makes f_u. A subspace with no patch
    gets a zero feature and an all-zero map."""
    tiny = torch.finfo(totals.dtype).tiny
    member = nn.functional.one_hot(subspace, 2).to(totals.dtype).T  # (2, k)
    mass = member @ totals  # (2,)
    features = (member * totals) @ merged / mass.clamp_min(tiny)[:, None]
    if membership.shape[0] == 0:
        return features, weight.new_zeros(2, 0)
    if membership.dim() == 1:  # hard: the subspace of each patch's cluster
        in_space = nn.functional.one_hot(subspace[membership], 2).to(weight.dtype).T  # (2, n)
    else:
        in_space = member.to(membership.dtype) @ membership.T  # (2, n)
    attention = in_space * weight[None, :] / mass.clamp_min(tiny)[:, None]
    return features, attention


@dataclass
class BagAggregation:
    """ITA of one bag (no padding): n patches, K clusters."""

    cluster: Tensor  # (n,) long
    is_centre: Tensor  # (n,) bool
    weight: Tensor  # (n,)
    merged: Tensor  # (K, d)
    totals: Tensor  # (K,) sum of w per cluster
    subspace: Tensor  # (K,) long
    features: Tensor  # (2, d): tumor, TME
    attention: Tensor  # (2, n)


class InformativeTokenAggregation(nn.Module):
    """Scorer + DPC-kNN clustering + weighted merge + subspace mapping."""

    def __init__(
        self,
        d: int,
        *,
        k: int = 2,
        knn: int = 5,
        n_anchors: int = 2048,
        n_candidates: int = 1024,
        score_clamp: float = 10.0,
        chunk_size: int = 8192,
        assignment: str = "soft",
        temperature: float = 2.0,
        candidates: str = "anchors",
        membership_scale: str = "spread",
    ) -> None:
        super().__init__()
        if k < 1 or knn < 1 or n_anchors < 2 or n_candidates < k:
            raise ValueError(f"bad ITA sizes: k={k}, knn={knn}, n_anchors={n_anchors}, n_candidates={n_candidates}")
        if assignment not in ASSIGNMENTS or not temperature > 0:
            raise ValueError(f"bad ITA assignment {assignment!r} / temperature {temperature} "
                             f"(one of {ASSIGNMENTS}, temperature > 0)")
        if candidates not in CANDIDATES or membership_scale not in MEMBERSHIP_SCALES:
            raise ValueError(f"bad ITA candidates {candidates!r} / membership scale {membership_scale!r} "
                             f"(one of {CANDIDATES} / {MEMBERSHIP_SCALES})")
        self.k, self.knn, self.n_anchors, self.n_candidates = k, knn, n_anchors, n_candidates
        self.score_clamp, self.chunk_size = score_clamp, chunk_size
        self.assignment, self.temperature = assignment, temperature
        self.candidates, self.membership_scale = candidates, membership_scale
        self.scorer = nn.Linear(d, 1)

    def aggregate(self, x: Tensor, *, prototypes: Tensor, keys: Tensor | None = None) -> BagAggregation:
        """One bag's tokens (n, d) -> BagAggregation (rows in the order given).

        The work runs in key order (a no-op when ``keys`` are already sorted, as the
        student passes them), so the floating-point sums do not depend on the row order
        either and a permuted bag gives bit-identical merged tokens."""
        n = x.shape[0]
        if keys is None:
            keys = permutation_keys(features=x.detach(), n_columns=x.shape[-1])
        order = None
        if not _is_sorted(keys):
            order = torch.sort(keys, stable=True).indices
            x, keys = x[order], keys[order]
        score = self.scorer(x).squeeze(-1).clamp(-self.score_clamp, self.score_clamp)
        weight = score.exp()
        centres = dpc_knn_centres(
            x, k=self.k, knn=self.knn, n_anchors=self.n_anchors, n_candidates=self.n_candidates,
            keys=keys, chunk_size=self.chunk_size, candidates=self.candidates,
        )
        cluster = assign_to_centres(x, centres)
        is_centre = torch.zeros(n, dtype=torch.bool, device=x.device)
        is_centre[centres] = True
        if self.assignment == "soft" and centres.numel() > 0:
            membership = soft_membership(x, centres, temperature=self.temperature, scale=self.membership_scale)
            membership = nn.functional.pad(membership, (0, self.k - centres.shape[0]))  # fewer tokens than k
            merged, totals = merge_soft(x, weight, membership)
        else:
            membership = cluster.clamp_min(0)
            merged, totals = merge_tokens(x, weight, membership, self.k)
        subspace = map_to_subspaces(merged, prototypes)
        features, attention = subspace_pool(merged, totals, subspace, weight, membership)
        if order is not None:  # back to the caller's row order
            cluster = torch.empty_like(cluster).index_copy_(0, order, cluster)
            is_centre = torch.empty_like(is_centre).index_copy_(0, order, is_centre)
            weight = weight.new_empty(n).index_copy(0, order, weight)
            attention = attention.new_empty(2, n).index_copy(1, order, attention)
        return BagAggregation(cluster, is_centre, weight, merged, totals, subspace, features, attention)

    def forward(
        self, tokens: Tensor, *, prototypes: Tensor, mask: Tensor | None = None, keys: Tensor | None = None
    ) -> tuple[ITAResult, Tensor, Tensor]:
        """Padded batch (B, N, d) -> (ITAResult, features (B, 2, d), attention (B, 2, N)).

        ``keys`` (B, N) int64 are optional permutation keys (default: hashed token bits)."""
        bsz, n_max, d = tokens.shape
        mask = torch.ones(bsz, n_max, dtype=torch.bool, device=tokens.device) if mask is None else mask.bool()
        cluster = torch.full((bsz, n_max), -1, dtype=torch.long, device=tokens.device)
        is_centre = torch.zeros(bsz, n_max, dtype=torch.bool, device=tokens.device)
        weights, attn, merged, subspace, feats = [], [], [], [], []
        for b in range(bsz):
            keep = mask[b]
            bag = self.aggregate(tokens[b][keep], prototypes=prototypes, keys=None if keys is None else keys[b][keep])
            cluster[b, keep] = bag.cluster
            is_centre[b, keep] = bag.is_centre
            weights.append(tokens.new_zeros(n_max).masked_scatter(keep, bag.weight))
            attn.append(tokens.new_zeros(2, n_max).masked_scatter(keep.expand(2, -1), bag.attention))
            merged.append(bag.merged)
            subspace.append(bag.subspace)
            feats.append(bag.features)
        result = ITAResult(
            cluster=cluster, is_centre=is_centre, weight=torch.stack(weights),
            merged=torch.stack(merged), subspace=torch.stack(subspace),
        )
        return result, torch.stack(feats), torch.stack(attn)
