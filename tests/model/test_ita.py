"""Informative token aggregation: DPC-kNN against a dense reference, the merge, the
subspace mapping and permutation behaviour (hypothesis where inputs vary freely)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_dismm.model.ita import (
    InformativeTokenAggregation,
    assign_to_centres,
    default_prototypes,
    dpc_knn_centres,
    map_to_subspaces,
    merge_tokens,
    soft_membership,
    permutation_keys,
    subspace_pool,
)

# --- an independent dense reference (numpy, float64, N x N) ---------------------------


def reference_dpc_knn(x: np.ndarray, keys: np.ndarray, *, k: int, knn: int) -> list[int]:
    """DPC-kNN written the textbook way with a full distance matrix and our tie rules:
    self left out of the kNN, density ties -> smaller key, the densest token's delta =
    largest pairwise distance, score = log rho + log delta, score ties -> denser token."""
    n, d = x.shape
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1) / d
    np.fill_diagonal(d2, np.inf)
    k_eff = max(1, min(knn, n - 1))
    log_rho = -np.sort(d2, axis=1)[:, :k_eff].mean(axis=1)
    order = np.lexsort((keys, -log_rho))  # density descending, then key ascending
    dist = np.sqrt(np.where(np.isinf(d2), 0.0, d2))
    rank = np.empty(n, dtype=int)
    rank[order] = np.arange(n)
    delta = np.empty(n)
    for i in range(n):
        denser = rank < rank[i]
        delta[i] = dist.max() if not denser.any() else dist[i, denser].min()
    score = log_rho + np.log(np.maximum(delta, 1e-300))
    best = sorted(range(n), key=lambda i: (-score[i], rank[i]))
    return best[:k]


def two_blobs(n_per: int, d: int, *, gap: float = 8.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centre = torch.zeros(d)
    centre[0] = gap
    a = torch.randn(n_per, d, generator=gen)
    b = torch.randn(n_per, d, generator=gen) + centre
    labels = torch.cat([torch.zeros(n_per, dtype=torch.long), torch.ones(n_per, dtype=torch.long)])
    return torch.cat([a, b]), labels


def reference_unit(d2: np.ndarray, scale: str) -> float:
    """The membership unit written out with loops: the spread of every token's distances
    around its own mean ("spread"), or the pooled within-cluster standard deviation of the
    gaps d2_ik - d2_i,own over clusters of >= 2 tokens and the other centres ("width")."""
    n, k = d2.shape
    if scale == "spread":
        return float((d2 - d2.mean(1, keepdims=True)).std())
    own = d2.argmin(1)
    total, weight = 0.0, 0
    for a in range(k):
        members = np.flatnonzero(own == a)
        if members.size < 2:
            continue
        for other in range(k):
            if other != a:
                total += members.size * (d2[members, other] - d2[members, a]).var()
                weight += members.size
    return float(np.sqrt(total / weight)) if weight else 0.0


# --- DPC-kNN ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("k", "knn"), [(2, 5), (3, 3), (5, 2)])
def test_exact_path_matches_dense_reference(seed: int, k: int, knn: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(80 + 7 * seed, 6, generator=gen)
    x[:20] += 3.0  # some structure so densities differ clearly
    keys = permutation_keys(features=x)
    ours = dpc_knn_centres(x, k=k, knn=knn, n_anchors=4096, n_candidates=4096, keys=keys)
    ref = reference_dpc_knn(x.double().numpy(), keys.numpy(), k=k, knn=knn)
    assert ours.tolist() == ref


def test_approximate_path_agrees_with_exact_on_two_blobs() -> None:
    x, labels = two_blobs(1500, 16, gap=12.0)
    exact_c = dpc_knn_centres(x, k=2, n_anchors=4096, n_candidates=4096)
    approx_c = dpc_knn_centres(x, k=2, n_anchors=128, n_candidates=64, chunk_size=257)
    partitions = []
    for centres in (exact_c, approx_c):
        assert sorted(labels[centres].tolist()) == [0, 1]  # one centre per blob
        cluster = assign_to_centres(x, centres, chunk_size=333)
        same = cluster == cluster[0]
        assert torch.equal(same, labels == labels[0])  # the partition is the blobs
        partitions.append(same)
    assert torch.equal(partitions[0], partitions[1])


def test_density_uses_anchor_subset_and_chunks_consistently() -> None:
    """The chunk size is an implementation detail: any chunking gives the same centres."""
    x, _ = two_blobs(400, 8, gap=5.0, seed=3)
    keys = permutation_keys(features=x)
    for rule in ("anchors", "densest"):
        a = dpc_knn_centres(x, k=3, n_anchors=200, n_candidates=50, keys=keys, chunk_size=17, candidates=rule)
        b = dpc_knn_centres(x, k=3, n_anchors=200, n_candidates=50, keys=keys, chunk_size=4096, candidates=rule)
        assert a.tolist() == b.tolist()


def test_candidates_contain_every_denser_token() -> None:
    """The former rule (format <= 3 models): with C candidates, exact delta: the centres
    equal those of the full (C = N) run whenever the true centres are dense (two tight blobs)."""
    x, _ = two_blobs(300, 4, gap=10.0, seed=5)
    full = dpc_knn_centres(x, k=2, n_anchors=4096, n_candidates=4096, candidates="densest")
    few = dpc_knn_centres(x, k=2, n_anchors=4096, n_candidates=120, candidates="densest")
    assert full.tolist() == few.tolist()


# --- properties of the aggregation ------------------------------------------------------


def make_ita(d: int, k: int, knn: int = 3, **kw) -> InformativeTokenAggregation:
    torch.manual_seed(0)
    return InformativeTokenAggregation(d, k=k, knn=knn, **kw)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 70),
    d=st.integers(2, 9),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    approx=st.booleans(),
    assignment=st.sampled_from(["hard", "soft"]),
    scale=st.sampled_from(["width", "spread"]),
    candidates=st.sampled_from(["anchors", "densest"]),
)
def test_aggregation_properties(n: int, d: int, k: int, seed: int, approx: bool, assignment: str, scale: str,
                                candidates: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * torch.rand(1, d, generator=gen) * 3
    sizes = {"n_anchors": 8, "n_candidates": max(k, 6)} if approx else {}
    ita = make_ita(d, k, assignment=assignment, membership_scale=scale, candidates=candidates, **sizes)
    bag = ita.aggregate(x, prototypes=default_prototypes(d))

    # every patch is in a cluster in [0, K); exactly min(n, K) centres, each in its own cluster
    assert bag.cluster.shape == (n,) and bag.cluster.min() >= 0 and bag.cluster.max() < k
    centres = bag.is_centre.nonzero().squeeze(1)
    assert centres.numel() == min(n, k)
    assert sorted(bag.cluster[centres].tolist()) == list(range(min(n, k)))
    w = torch.exp(ita.scorer(x).squeeze(-1).clamp(-10, 10))
    torch.testing.assert_close(bag.weight, w)
    if assignment == "hard":  # merged tokens are the w-weighted cluster means, recomputed directly
        membership = torch.nn.functional.one_hot(bag.cluster, k).float()
    else:  # ... or the (w p)-weighted means over all patches, p recomputed from the centres
        order = centres[bag.cluster[centres].argsort()]  # centre of cluster 0, 1, ...
        d2 = ((x[:, None, :] - x[None, order, :]) ** 2).sum(-1) / d
        if order.numel() > 1:
            unit = reference_unit(d2.double().numpy(), scale)
            unit = max(unit, 1e-6 * float(d2.mean()), torch.finfo(torch.float32).tiny)
            membership = torch.softmax(-d2 / (ita.temperature * unit), dim=1)
        else:
            membership = torch.ones(n, 1)
        membership = torch.nn.functional.pad(membership, (0, k - order.numel()))
        # the cluster shown is the nearest centre, the membership's largest entry
        assert torch.all(membership.gather(1, bag.cluster[:, None]).squeeze(1) >= membership.amax(1) - 1e-6)
    for c in range(k):
        mass = w * membership[:, c]
        if mass.sum() > 0:
            expected = (mass[:, None] * x).sum(0) / mass.sum()
            torch.testing.assert_close(bag.merged[c], expected, rtol=1e-4, atol=1e-4)
        else:
            assert torch.all(bag.merged[c] == 0)
    # per-patch attention: sums to 1 per non-empty subspace and pools to the features
    for u in range(2):
        if bag.attention[u].sum() > 0:
            torch.testing.assert_close(bag.attention[u].sum(), torch.tensor(1.0))
        torch.testing.assert_close(bag.attention[u] @ x, bag.features[u], rtol=1e-4, atol=1e-4)

    # permuting the patches permutes per-patch outputs, merged tokens are bit-identical
    perm = torch.randperm(n, generator=gen)
    moved = ita.aggregate(x[perm], prototypes=default_prototypes(d))
    assert torch.equal(moved.cluster, bag.cluster[perm])
    assert torch.equal(moved.is_centre, bag.is_centre[perm])
    assert torch.equal(moved.weight, bag.weight[perm])
    assert torch.equal(moved.merged, bag.merged)
    assert torch.equal(moved.subspace, bag.subspace)
    assert torch.equal(moved.attention, bag.attention[:, perm])


def test_duplicate_tokens_still_give_k_distinct_centres() -> None:
    x = torch.cat([torch.zeros(10, 3), torch.ones(10, 3)])
    bag = make_ita(3, 3).aggregate(x, prototypes=default_prototypes(3))
    assert int(bag.is_centre.sum()) == 3
    assert set(bag.cluster.tolist()) <= {0, 1, 2}


def test_gradients_reach_scorer_and_tokens() -> None:
    x = torch.randn(40, 5, requires_grad=True)
    ita = make_ita(5, 2)
    bag = ita.aggregate(x, prototypes=default_prototypes(5))
    (bag.features[0].pow(2).sum() + bag.merged[1].sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert ita.scorer.weight.grad is not None and ita.scorer.weight.grad.abs().sum() > 0


def test_padded_batch_equals_bags_one_by_one() -> None:
    ita = make_ita(4, 2)
    protos = default_prototypes(4)
    a, b = torch.randn(30, 4), torch.randn(12, 4)
    tokens = torch.zeros(2, 30, 4)
    tokens[0], tokens[1, :12] = a, b
    tokens[1, 12:] = 99.0  # padding content must not matter
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[0], mask[1, :12] = True, True
    result, feats, attn = ita(tokens, prototypes=protos, mask=mask)
    for i, bag_x in enumerate((a, b)):
        alone = ita.aggregate(bag_x, prototypes=protos)
        n = bag_x.shape[0]
        assert torch.equal(result.cluster[i, :n], alone.cluster)
        torch.testing.assert_close(result.merged[i], alone.merged)
        torch.testing.assert_close(feats[i], alone.features)
        torch.testing.assert_close(attn[i, :, :n], alone.attention)
    assert torch.all(result.cluster[1, 12:] == -1)
    assert torch.all(result.weight[1, 12:] == 0) and torch.all(attn[1, :, 12:] == 0)
    assert not result.is_centre[1, 12:].any()


def test_empty_bag_gives_zero_features() -> None:
    bag = make_ita(4, 2).aggregate(torch.zeros(0, 4), prototypes=default_prototypes(4))
    assert bag.cluster.shape == (0,) and torch.all(bag.features == 0)


# --- merge and subspace mapping ----------------------------------------------------------


def test_merge_tokens_with_empty_cluster() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0]])
    w = torch.tensor([1.0, 3.0, 2.0])
    merged, totals = merge_tokens(x, w, torch.tensor([0, 0, 2]), 3)
    torch.testing.assert_close(merged, torch.tensor([[2.5, 0.0], [0.0, 0.0], [0.0, 5.0]]))
    torch.testing.assert_close(totals, torch.tensor([4.0, 0.0, 2.0]))


def test_two_tokens_map_one_to_one() -> None:
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # both tokens lean to tumor; the one leaning more is tumor, the other must be TME
    merged = torch.tensor([[1.0, 0.5], [1.0, 0.1]])
    assert map_to_subspaces(merged, protos).tolist() == [1, 0]
    assert map_to_subspaces(merged, protos.flip(0)).tolist() == [0, 1]


def test_more_tokens_fill_both_subspaces() -> None:
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    merged = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.3], [0.7, 0.2]])
    sub = map_to_subspaces(merged, protos)
    assert sub.tolist() == [0, 0, 1, 0]


@pytest.mark.parametrize("scale", ["width", "spread"])
def test_soft_membership_sharpens_to_the_nearest_centre(scale: str) -> None:
    x = torch.tensor([[0.0, 0.0], [0.2, 0.0], [1.0, 1.0], [0.9, 1.0], [0.5, 0.5]])
    centres = torch.tensor([0, 2])
    for temperature in (1.0, 0.01):
        p = soft_membership(x, centres, temperature=temperature, scale=scale)
        torch.testing.assert_close(p.sum(1), torch.ones(5))
        assert p[:2, 0].min() > 0.5 and p[2:4, 1].min() > 0.5
        torch.testing.assert_close(p[4], torch.tensor([0.5, 0.5]))  # equidistant
    sharp = soft_membership(x, centres, temperature=0.01, scale=scale)
    torch.testing.assert_close(sharp[:4], torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
    # the same memberships at any token scale: the temperature is relative to the tokens' own unit
    torch.testing.assert_close(soft_membership(10 * x, centres, temperature=1.0, scale=scale),
                               soft_membership(x, centres, temperature=1.0, scale=scale))


def planted_two_modes(separation: float, *, n: int = 2000, d: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two equal Gaussian modes (unit variance per dimension) whose means are
    ``separation`` standard deviations apart along a random direction; tokens alternate."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=gen)
    direction = direction / direction.norm()
    labels = torch.arange(n) % 2
    x = torch.randn(n, d, generator=gen) + (labels[:, None].float() - 0.5) * separation * direction
    return x, labels


def own_membership(x: torch.Tensor, *, scale: str, temperature: float) -> float:
    centres = dpc_knn_centres(x, k=2)
    cluster = assign_to_centres(x, centres)
    p = soft_membership(x, centres, temperature=temperature, scale=scale)
    return float(p.gather(1, cluster[:, None]).mean())


def test_width_memberships_sharpen_as_the_modes_separate_and_spread_ones_do_not() -> None:
    """Issue 14: with the former unit (the spread of all distances, which grows with the
    separation) a patch kept ~0.73 of its own cluster at tau = 2 however far apart the
    modes; with the clusters' width as unit, memberships grow towards hard as the modes
    separate and stay soft where one mode is merely cut in two (measured, tau = 1:
    0.75 / 0.92 / 0.998 at 1 / 8 / 16 standard deviations; spread 0.67 / 0.72 / 0.73)."""
    separations = (1.0, 8.0, 16.0)
    width = [own_membership(planted_two_modes(s)[0], scale="width", temperature=1.0) for s in separations]
    spread = [own_membership(planted_two_modes(s)[0], scale="spread", temperature=2.0) for s in separations]
    assert width[0] < width[1] < width[2]
    assert width[0] < 0.85 and width[2] > 0.99
    assert max(spread) < 0.76


def test_soft_assignment_lets_the_loss_move_tokens_between_clusters() -> None:
    """The reason for soft merging: a loss on a merged token reaches the tokens through
    their memberships (hard merging gives no gradient to anything but the weights and the
    token values inside its own cluster)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(20, 4, generator=gen), torch.randn(20, 4, generator=gen) + 4.0])
    grads = {}
    for assignment in ("hard", "soft"):
        ita = make_ita(4, 2, assignment=assignment)
        tokens = x.clone().requires_grad_(True)
        bag = ita.aggregate(tokens, prototypes=default_prototypes(4))
        # a loss on cluster 0's merged token only
        bag.merged[0].sum().backward()
        outside = bag.cluster != 0
        grads[assignment] = tokens.grad[outside].abs().sum()
    assert grads["hard"] == 0 and grads["soft"] > 0


def test_subspace_pool_weights_clusters_by_total_weight() -> None:
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 8.0]])
    w = torch.tensor([1.0, 1.0, 1.0, 3.0])
    cluster = torch.tensor([0, 1, 2, 2])
    merged, totals = merge_tokens(x, w, cluster, 3)
    sub = torch.tensor([0, 0, 1])
    feats, attn = subspace_pool(merged, totals, sub, w, cluster)
    torch.testing.assert_close(attn[0], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(attn[1], torch.tensor([0.0, 0.0, 0.25, 0.75]))
    torch.testing.assert_close(feats, attn @ x)
    torch.testing.assert_close(feats[1], merged[2])


def test_permutation_keys_follow_content_not_position() -> None:
    x = torch.randn(50, 32)
    xy = torch.randint(0, 10**6, (50, 2))
    perm = torch.randperm(50)
    keys = permutation_keys(features=x, coords=xy)
    assert torch.equal(permutation_keys(features=x[perm], coords=xy[perm]), keys[perm])
    assert permutation_keys(features=x, coords=xy).unique().numel() == 50
    # integer and float coordinates of the same patches hash alike
    assert torch.equal(permutation_keys(features=x, coords=xy), permutation_keys(features=x, coords=xy.double()))
