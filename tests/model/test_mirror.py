"""MIRROR model: losses against direct computations, the [CLS] attention, coordinates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_dismm.errors import DataError, ModelConfigError
from napari_dismm.model.checkpoint import load_model, save_model
from napari_dismm.model.mirror import Mirror, MirrorConfig
from napari_dismm.model.mirror.encoders import cls_attention, lattice_cells
from napari_dismm.model.mirror.losses import (
    alignment_loss,
    balance_loss,
    balanced_labels,
    gaussian_kl,
    mean_assignment_entropy,
    retention_loss,
    sinkhorn_targets,
    swapped_prediction_loss,
    symmetric_kl,
)
from napari_dismm.model.registry import build_model



pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = {"kind": "mirror", "d_in": 12, "d": 16, "n_genes": 9, "n_prototypes": 6, "magnifications": ("20x",),
         "n_heads": 2, "rna_tokens": 3, "d_latent": 8, "dropout": 0.0}


def _bag(n: int, seed: int = 0, d_in: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    side = int(math.ceil(math.sqrt(n)))
    idx = torch.arange(n)
    coords = torch.stack([idx % side, idx // side], dim=1) * 448 + 1000
    return torch.randn(n, d_in, generator=g), coords


def test_alignment_loss_equals_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    scale = 3.7
    na = [row / math.sqrt(float(row @ row)) for row in a]
    nb = [row / math.sqrt(float(row @ row)) for row in b]
    sim = [[scale * float(na[i] @ nb[j]) for j in range(5)] for i in range(5)]
    rows = [-(sim[i][i] - math.log(sum(math.exp(s) for s in sim[i]))) for i in range(5)]
    cols = [-(sim[j][j] - math.log(sum(math.exp(sim[i][j]) for i in range(5)))) for j in range(5)]
    expected = 0.5 * (sum(rows) / 5 + sum(cols) / 5)
    assert float(alignment_loss(a, b, scale=scale)) == pytest.approx(expected, rel=1e-10)
    # matched pairs score lower than shuffled ones
    assert float(alignment_loss(a, a, scale=scale)) < float(alignment_loss(a, a[[1, 2, 3, 4, 0]], scale=scale))
    with pytest.raises(DataError):
        alignment_loss(a[:1], b[:1], scale=scale)


def test_logit_scale_starts_at_one_over_007_and_is_clamped_at_100():
    model = Mirror(MirrorConfig(**SMALL))
    assert float(model.scale().detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert float(model.scale().detach()) == pytest.approx(100.0)


def test_retention_is_zero_for_a_perfect_decoder_and_its_target_gets_no_gradient():
    target = torch.randn(20, 8, requires_grad=True)
    masked = torch.rand(20) < 0.75
    masked[0] = True
    perfect = target.detach().clone().requires_grad_(True)
    assert float(retention_loss(perfect, target, masked).detach()) == 0.0
    wrong = (target.detach() + torch.randn(20, 8)).requires_grad_(True)
    loss = retention_loss(wrong, target, masked)
    assert float(loss) > 0.1
    loss.backward()
    assert target.grad is None  # stop-gradient target
    assert wrong.grad[~masked].abs().sum() == 0  # only the masked part counts
    assert wrong.grad[masked].abs().sum() > 0


def test_style_and_cluster_terms():
    mu, logvar = torch.zeros(4, 3), torch.zeros(4, 3)
    assert float(gaussian_kl(mu, logvar)) == 0.0
    assert float(gaussian_kl(mu + 1.0, logvar)) == pytest.approx(1.5)  # 0.5 * sum(mu^2)
    p = torch.softmax(torch.randn(6, 5), dim=-1)
    q = torch.softmax(torch.randn(6, 5), dim=-1)
    assert float(symmetric_kl(p, p)) == pytest.approx(0.0, abs=1e-6)
    assert float(symmetric_kl(p, q)) == pytest.approx(float(symmetric_kl(q, p)))
    assert float(symmetric_kl(p, q)) > 0
    uniform = torch.eye(5)  # five samples, one prototype each: the batch uses all evenly
    collapsed = torch.zeros(5, 5)
    collapsed[:, 2] = 1.0
    assert float(balance_loss(uniform)) == pytest.approx(0.0, abs=1e-6)
    assert float(balance_loss(collapsed)) == pytest.approx(math.log(5), abs=1e-6)
    flat = torch.full((5, 5), 0.2)  # every sample the same undecided assignment: also a collapse
    assert float(balance_loss(flat)) == pytest.approx(math.log(5), abs=1e-5)
    assert float(balance_loss(p)) > 0
    assert float(mean_assignment_entropy(uniform)) == pytest.approx(math.log(5), abs=1e-6)


def _sinkhorn_by_hand(scores: np.ndarray, epsilon: float, n_iters: int) -> np.ndarray:
    """Reference: the plain Sinkhorn-Knopp loop on Q = exp(S / eps)^T (K x B)."""
    q = np.exp(scores.T / epsilon)
    q /= q.sum()
    k, b = q.shape
    for _ in range(n_iters):
        q /= q.sum(axis=1, keepdims=True) * k  # each prototype: 1/K
        q /= q.sum(axis=0, keepdims=True) * b  # each sample: 1/B
    return (q * b).T


def test_sinkhorn_targets_match_a_direct_computation_and_balance_a_collapsed_batch():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(6, 4, generator=g, dtype=torch.float64) * 2 - 1  # cosines
    expected = _sinkhorn_by_hand(scores.numpy(), 0.5, 3)
    np.testing.assert_allclose(sinkhorn_targets(scores, epsilon=0.5, n_iters=3).numpy(), expected, rtol=1e-9)
    # a collapsed batch: every sample scores prototype 2 highest by a wide margin
    collapsed = torch.full((8, 4), -1.0, dtype=torch.float64)
    collapsed[:, 2] = 1.0
    collapsed += 0.01 * torch.randn(8, 4, generator=g, dtype=torch.float64)
    q = sinkhorn_targets(collapsed, epsilon=0.05, n_iters=3)
    torch.testing.assert_close(q.sum(1), torch.ones(8, dtype=torch.float64))
    # the batch's targets still use every prototype about equally (the prediction never would)
    assert float(q.mean(0).min()) > 0.2 and float(q.mean(0).max()) < 0.3
    assert float(mean_assignment_entropy(q)) > 0.99 * math.log(4)
    assert float(mean_assignment_entropy(torch.softmax(collapsed / 0.1, dim=-1))) < 0.01 * math.log(4)
    # huge scores stay finite (log-space); no gradient flows into the scores
    big = (1000 * torch.randn(5, 7, generator=g)).requires_grad_(True)
    t = sinkhorn_targets(big, epsilon=0.05, n_iters=3)
    assert bool(torch.isfinite(t).all()) and not t.requires_grad


def test_balanced_labels_spread_near_identical_samples():
    g = torch.Generator().manual_seed(5)
    shared = torch.rand(16, generator=g) * 2 - 1
    scores = shared + 1e-3 * torch.randn(8, 16, generator=g)  # 8 samples, all alike
    assert len(set(scores.argmax(1).tolist())) == 1  # the raw argmax collapses
    labels = balanced_labels(scores)
    assert labels.shape == (8, 16) and bool((labels.sum(1) == 1).all())
    assert len(set(labels.argmax(1).tolist())) >= 6  # the equal-partition plan does not


def test_swapped_prediction_charges_a_collapsed_prediction():
    g = torch.Generator().manual_seed(4)
    scores_a = torch.randn(8, 8, generator=g)
    scores_b = torch.randn(8, 8, generator=g)
    q_a, q_b = sinkhorn_targets(scores_a), sinkhorn_targets(scores_b)
    # predictions equal to the swapped targets: loss 0
    exact = swapped_prediction_loss(q_b.log(), q_a.log(), q_a, q_b)
    assert float(exact) == pytest.approx(0.0, abs=1e-5)
    # everyone on one prototype: the balanced targets make it expensive, and the gradient
    # pushes the logits of the other prototypes up
    collapsed = torch.full((8, 8), -5.0)
    collapsed[:, 0] = 5.0
    collapsed.requires_grad_(True)
    loss = swapped_prediction_loss(collapsed, collapsed, sinkhorn_targets(collapsed.detach() / 10),
                                   sinkhorn_targets(collapsed.detach() / 10))
    assert float(loss) > 1.0
    loss.backward()
    assert bool((collapsed.grad[:, 0] > 0).all())  # descending lowers the winning prototype


def test_cls_attention_is_the_exact_attention_of_the_cls_query():
    torch.manual_seed(0)
    model = Mirror(MirrorConfig(**SMALL)).eval()
    block = model.slide["20x"].blocks[-1]
    attn = block.attn
    attn.chunk_size = 7  # exercise the chunked passes
    x = torch.randn(30, 16)
    weights = cls_attention(attn, x)  # (n, h)
    heads, e = attn.n_heads, 16 // attn.n_heads
    k, v = attn.to_kv(x).chunk(2, dim=-1)
    q = attn.to_q(x[:1]).view(heads, e).softmax(-1)
    for h in range(heads):
        cols = slice(h * e, (h + 1) * e)
        dense = (k[:, cols].softmax(dim=0) * q[h]).sum(-1)  # a_j = sum_e q_e softmax_j(k_je)
        torch.testing.assert_close(weights[:, h], dense.detach(), rtol=1e-5, atol=1e-6)
        assert float(weights[:, h].sum()) == pytest.approx(1.0, abs=1e-5)
    # the [CLS] output of the layer (before to_out) is the attention-weighted sum of values
    ctx = attn.context(x)
    out = torch.cat([q.reshape(1, -1)]) @ ctx
    for h in range(heads):
        cols = slice(h * e, (h + 1) * e)
        torch.testing.assert_close(out[0, cols], (weights[:, h:h + 1] * v[:, cols]).sum(0).detach(),
                                   rtol=1e-4, atol=1e-5)


def test_forward_permutation_equivariance_and_padding():
    torch.manual_seed(0)
    model = Mirror(MirrorConfig(**SMALL)).eval()
    x, xy = _bag(40)
    perm = torch.randperm(40)
    with torch.no_grad():
        a = model({"20x": x[None]}, coords={"20x": xy[None]})
        b = model({"20x": x[perm][None]}, coords={"20x": xy[perm][None]})
        padded = torch.cat([x, torch.randn(5, 12)])[None]
        pxy = torch.cat([xy, torch.zeros(5, 2, dtype=xy.dtype)])[None]
        mask = torch.ones(1, 45, dtype=torch.bool)
        mask[0, 40:] = False
        c = model({"20x": padded}, coords={"20x": pxy}, masks={"20x": mask})
    ma, mb = a.attention["20x"]["cls"][0], b.attention["20x"]["cls"][0]
    torch.testing.assert_close(ma[perm], mb, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.features["20x"]["cls"], b.features["20x"]["cls"], rtol=1e-4, atol=1e-5)
    assert float(ma.sum()) == pytest.approx(1.0, abs=1e-5) and bool((ma >= 0).all())
    torch.testing.assert_close(c.logits, a.logits, rtol=1e-4, atol=1e-5)
    assert float(c.attention["20x"]["cls"][0, 40:].abs().sum()) == 0.0
    assert a.probabilities.shape == (1, 4)
    # the position comes from the coordinates: moving patches changes the embedding
    moved = xy.clone()
    moved[:10] = moved[:10] + 448 * 20
    with torch.no_grad():
        d = model({"20x": x[None]}, coords={"20x": moved[None]})
    assert not torch.allclose(d.features["20x"]["cls"], a.features["20x"]["cls"], atol=1e-4)


def test_lattice_from_real_coordinates():
    _, xy = _bag(25)  # 5 x 5 lattice, step 448, offset 1000
    cells, shape = lattice_cells(xy)
    assert shape == (5, 5)
    assert sorted(map(tuple, cells.tolist())) == [(r, c) for r in range(5) for c in range(5)]
    sparse = torch.tensor([[0, 0], [448, 0], [448 * 1000, 448 * 1000]])  # far outlier: coarsened
    cells, (rows, cols) = lattice_cells(sparse)
    assert rows * cols <= 64 and len({tuple(c) for c in cells.tolist()}) >= 2


def test_pretraining_step_reduces_the_loss_and_needs_coordinates():
    torch.manual_seed(0)
    model = Mirror(MirrorConfig(**SMALL))
    bags = torch.stack([_bag(30, seed=s)[0] for s in range(4)])
    coords = torch.stack([_bag(30)[1]] * 4)
    genes = torch.randn(4, 9)
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(25):
        torch.manual_seed(step)
        loss, parts = model.pretrain_losses({"20x": bags}, genes=genes, coords={"20x": coords})
        assert set(parts) == {"align", "ret_wsi", "ret_rna", "style", "cluster"}
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    with pytest.raises(DataError, match="coordinates"):
        model.pretrain_losses({"20x": bags}, genes=genes, coords={})
    with pytest.raises(DataError):
        model.pretrain_losses({"20x": bags}, genes=torch.randn(4, 3), coords={"20x": coords})


def test_registry_checkpoint_round_trip_and_bad_config(tmp_path):
    torch.manual_seed(0)
    model = build_model(dict(SMALL))
    with torch.no_grad():
        model.feature_mean.fill_(0.3)
    save_model(model, tmp_path / "m", extra={"class_names": ["a", "b", "c", "d"]})
    loaded, doc = load_model(tmp_path / "m")
    assert doc["model"]["kind"] == "mirror" and isinstance(loaded, Mirror)
    x, xy = _bag(20)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()({"20x": x[None]}, coords={"20x": xy[None]}).logits,
                                   loaded({"20x": x[None]}, coords={"20x": xy[None]}).logits)
    for bad in ({"mask_ratio": 1.0}, {"n_prototypes": 1}, {"w_align": -1.0}, {"n_heads": 3},
                {"sinkhorn_epsilon": 0.0}, {"sinkhorn_iters": 0}):
        with pytest.raises(ModelConfigError):
            MirrorConfig(**{**SMALL, **bad})
    defaults = MirrorConfig()
    assert (defaults.w_align, defaults.w_ret_wsi, defaults.w_ret_rna, defaults.w_style, defaults.w_cluster) == (
        0.5, 0.15, 0.15, 0.1, 0.1)
    assert (defaults.mask_ratio, defaults.d_latent, defaults.max_logit_scale) == (0.75, 128, 100.0)
