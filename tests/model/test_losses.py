"""Task losses, survival bins, the DEV loss (with its grid pooling) and distillation."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_dismm.errors import DataError
from napari_dismm.model.grid import grid_index_20x_to_10x, pool_onto_10x
from napari_dismm.model.losses import (
    attention_loss,
    class_weights_from_labels,
    classification_loss,
    dev_loss,
    DEV_FORMS,
    dev_term,
    distillation_loss,
    feature_loss,
    kd_loss,
    survival_bins_from_times,
    survival_nll,
    time_to_bin,
)
from tests.model.model_helpers import grid_coords

# --- task losses --------------------------------------------------------------------


def test_survival_nll_by_hand():
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0], [0.5, 0.5, 0.5, 0.5]])
    h = torch.sigmoid(logits)
    # patient 0: event in bin 2 -> -log(1-h0) - log(1-h1) - log h2
    # patient 1: censored in bin 1 -> -log(1-h0) - log(1-h1)
    l0 = -(torch.log(1 - h[0, 0]) + torch.log(1 - h[0, 1]) + torch.log(h[0, 2]))
    l1 = -(torch.log(1 - h[1, 0]) + torch.log(1 - h[1, 1]))
    out = survival_nll(logits, torch.tensor([2, 1]), torch.tensor([1, 0]))
    torch.testing.assert_close(out, (l0 + l1) / 2)
    weighted = survival_nll(logits, torch.tensor([2, 1]), torch.tensor([1, 0]), alpha=0.4)
    torch.testing.assert_close(weighted, (0.6 * (l0 + l1) + 0.4 * l0) / 2)


def test_survival_nll_is_finite_for_extreme_logits():
    logits = torch.tensor([[100.0, -100.0, 100.0, -100.0]], requires_grad=True)
    out = survival_nll(logits, torch.tensor([3]), torch.tensor([1]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(logits.grad).all()


def test_class_weights_balance_the_classes():
    w = class_weights_from_labels([0, 0, 0, 1], 3)
    torch.testing.assert_close(w, torch.tensor([4 / 6, 2.0, 0.0]))
    logits = torch.randn(4, 3)
    y = torch.tensor([0, 0, 0, 1])
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    expected = (w[y] * per).sum() / w[y].sum()
    torch.testing.assert_close(classification_loss(logits, y, class_weights=w), expected)


def test_survival_bins_from_uncensored_quartiles():
    times = [1, 2, 3, 4, 5, 100, 200]
    events = [1, 1, 1, 1, 1, 0, 0]
    edges = survival_bins_from_times(times, events, n_bins=4)
    np.testing.assert_allclose(edges, [0, 2, 3, 4, np.inf])
    np.testing.assert_array_equal(time_to_bin([0, 1.9, 2, 3.5, 4, 1e6], edges), [0, 0, 1, 2, 3, 3])
    with pytest.raises(DataError, match="uncensored"):
        survival_bins_from_times([1, 2], [0, 0])
    with pytest.raises(DataError, match=">= 0"):
        time_to_bin([-1.0], edges)


# --- grid pooling -------------------------------------------------------------------


def test_pooling_onto_10x_grid_by_hand():
    c10 = torch.tensor([[[0, 0], [448, 0], [0, 448]]])
    c20 = torch.tensor([[[0, 0], [224, 0], [448, 224], [224, 448], [900, 900], [0, 0]]])
    m20 = torch.tensor([[True, True, True, True, True, False]])
    index = grid_index_20x_to_10x(c10, c20, None, m20, patch_size_10x_level0=448)
    assert index.tolist() == [[0, 0, 1, 2, -1, -1]]
    att20 = torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25, 0.0]])
    pooled = pool_onto_10x(att20, index, 3)
    torch.testing.assert_close(pooled, torch.tensor([[0.3, 0.3, 0.15]]))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 60), st.integers(0, 10_000), st.sampled_from([0.0, 17.0, 300.0]))
def test_lattice_lookup_equals_containment(n, seed, origin):
    """The hashed lattice path and the general containment path agree (shuffled grids)."""
    size = 448.0
    c10 = grid_coords(n, size, seed=seed, origin=origin)[None]
    # 20x patches: the four quarters of each 10x patch, plus a few off-grid strays
    quarters = torch.tensor([[0, 0], [224, 0], [0, 224], [224, 224]], dtype=torch.float64)
    c20 = (c10[0][:, None, :] + quarters[None]).reshape(-1, 2)
    c20 = torch.cat([c20, torch.tensor([[-5000.0, -5000.0], [1e5, 3.0]])])
    c20 = c20[torch.randperm(len(c20), generator=torch.Generator().manual_seed(seed))][None]
    fast = grid_index_20x_to_10x(c10, c20, None, None, patch_size_10x_level0=size)
    # jitter one 10x coordinate by a sub-pixel amount: forces the general path
    c10_slow = c10.clone()
    c10_slow[0, 0] += 1e-3
    slow = grid_index_20x_to_10x(c10_slow, c20, None, None, patch_size_10x_level0=size)
    assert torch.equal(fast, slow)
    assert (fast >= 0).sum() == 4 * n


# --- DEV ----------------------------------------------------------------------------


def _dev_case(att10, att20, c10, c20, form="reference", masks10=None):
    return dev_loss(
        {"tumor": att10, "tme": att10}, {"tumor": att20, "tme": att20}, c10, c20, masks10, masks10,
        patch_size_10x_level0=448, form=form,
    )


def test_dev_zero_when_all_samples_equally_consistent_positive_otherwise():
    # 2 samples, each with 10x patches in a row; 20x patches are the top-left quarters
    c10 = torch.tensor([[[0, 0], [448, 0], [896, 0]]] * 2).double()
    c20 = c10.clone()  # quarter at the same top-left lies in the same 10x cell
    same = torch.tensor([[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]])
    assert _dev_case(same, same, c10, c20) == 0
    # disjoint supports with 10x == pooled 20x: S is diagonal, every normalised diag is 1
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    assert _dev_case(a, a, c10, c20) == pytest.approx(0.0, abs=1e-6)
    # sample 1's 10x attention matches sample 0's 20x map better than its own 20x map:
    # normalised diagonal (1, 0) -> variance 0.5 per subspace, scale 1, mean of the two subspaces
    a10 = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    b20 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert _dev_case(a10, b20, c10, c20) == pytest.approx(0.5)


def test_dev_term_by_hand_and_single_sample():
    a10 = torch.tensor([[1.0, 0.0], [0.6, 0.4]])
    a20 = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    s = a10 @ a20.T
    s = s / s.norm(dim=1, keepdim=True)
    expected = torch.var(torch.diagonal(s), unbiased=True)
    torch.testing.assert_close(dev_term(a10, a20, form="reference"), expected)
    for form in DEV_FORMS:
        assert dev_term(a10[:1], a20[:1], form=form) == 0
    with pytest.raises(ValueError, match="DEV form"):
        dev_term(a10, a20, form="other")


def test_dev_per_slide_charges_slides_below_the_mean_correlation():
    torch.manual_seed(0)
    a10, a20 = torch.rand(4, 9), torch.rand(4, 9)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[2, 6:] = False
    r = []
    for i in range(4):
        n = int(mask[i].sum())
        r.append(np.corrcoef(a10[i, :n].numpy(), a20[i, :n].numpy())[0, 1])
    r = np.array(r)
    expected = np.sum(np.clip(r.mean() - r, 0, None) ** 2) / 3
    got = dev_term(a10 * mask, a20 * mask, form="per_slide", mask=mask)
    assert expected > 0 and float(got) == pytest.approx(expected, rel=1e-4)


def test_dev_agreement_charges_every_slide_its_distance_from_perfect_agreement():
    torch.manual_seed(0)
    a10, a20 = torch.rand(4, 9), torch.rand(4, 9)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 5:] = False
    r = np.array([np.corrcoef(a10[i, :int(mask[i].sum())].numpy(), a20[i, :int(mask[i].sum())].numpy())[0, 1]
                  for i in range(4)])
    got = dev_term(a10 * mask, a20 * mask, form="agreement", mask=mask)
    assert float(got) == pytest.approx(np.mean((1 - r) ** 2), rel=1e-4)
    # maps that agree up to scale and offset cost nothing, whatever their sizes
    same = dev_term(a10 * mask, (3 * a10 + 1) * mask, form="agreement", mask=mask)
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    # and every slide below 1 gets a gradient, the best one too (unlike per_slide)
    x = a10.clone().requires_grad_(True)
    dev_term(x, a20, form="agreement").backward()
    assert bool((x.grad.abs().sum(dim=1) > 0).all())


def test_dev_per_slide_gradient_raises_laggards_and_leaves_leaders():
    """The batch mean is a fixed target: only the less consistent slides get a gradient."""
    torch.manual_seed(1)
    base = torch.rand(3, 10)
    noise = torch.rand(3, 10)
    a20 = base.clone()
    a20[0] = 0.2 * base[0] + 0.8 * noise[0]  # slide 0 disagrees with itself most
    a10 = base.clone().requires_grad_(True)
    dev_term(a10, a20, form="per_slide").backward()
    r = torch.stack([torch.corrcoef(torch.stack([base[i], a20[i]]))[0, 1] for i in range(3)])
    leaders = r >= r.mean()
    assert a10.grad[0].abs().sum() > 0 and not leaders[0]
    assert torch.all(a10.grad[leaders] == 0)


def test_dev_per_slide_is_zero_for_consistent_slides_of_any_size_where_the_reference_is_not():
    """The reason for the default: slides whose 10x and 20x maps agree perfectly, with bags of
    different sizes, cost nothing per slide; the reference's cross-slide row norm charges them."""
    c10 = torch.stack([grid_coords(12, 448, seed=s) for s in range(3)])
    m10 = torch.zeros(3, 12, dtype=torch.bool)
    maps = torch.zeros(3, 12)
    for i, (n, peak) in enumerate([(12, [0, 1, 2]), (8, [5, 6]), (5, [4])]):
        m10[i, :n] = True
        maps[i, :n] = 0.2 / n
        maps[i, peak] += 0.8 / len(peak)
    for form in ("per_slide", "agreement"):
        assert float(_dev_case(maps, maps, c10, c10, form=form, masks10=m10)) == pytest.approx(0.0, abs=1e-6)
    assert float(_dev_case(maps, maps, c10, c10, form="reference", masks10=m10)) > 1e-4
    # and it sees a slide that disagrees with itself across magnifications
    flipped = maps.clone()
    flipped[0, :12] = flipped[0, :12].flip(0)
    assert float(_dev_case(maps, flipped, c10, c10, form="per_slide", masks10=m10)) > 1e-2


def test_dev_loss_gradients_reach_both_magnifications_with_padding():
    c10 = torch.stack([grid_coords(5, 448, seed=1), grid_coords(5, 448, seed=2)])
    c20 = c10.clone()
    m10 = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    s10 = torch.randn(2, 5, requires_grad=True)
    s20 = torch.randn(2, 5, requires_grad=True)
    a10 = torch.softmax(s10.masked_fill(~m10, -1e9), -1)
    a20 = torch.softmax(s20.masked_fill(~m10, -1e9), -1)
    loss = dev_loss({"tumor": a10, "tme": a10}, {"tumor": a20, "tme": a20}, c10, c20, m10, m10, patch_size_10x_level0=448)
    loss.backward()
    assert loss > 0 and s10.grad.abs().sum() > 0 and s20.grad.abs().sum() > 0
    assert torch.all(s20.grad[1, 3:] == 0)


# --- distillation --------------------------------------------------------------------


@pytest.mark.parametrize("task", ["classification", "survival"])
def test_kd_zero_on_agreement_positive_otherwise(task):
    t = torch.randn(4, 4)
    assert kd_loss(t.clone(), t, task=task) == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(t + torch.randn(4, 4), t, task=task) > 0


def test_kd_by_hand_classification():
    s, t = torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 0.0]])
    p, q = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    expected = 4 * (p * (p.log() - q.log())).sum()
    torch.testing.assert_close(kd_loss(s, t, task="classification"), expected)


def test_feature_loss_ignores_scale_and_is_per_subspace():
    t = {"tumor": torch.randn(3, 8), "tme": torch.randn(3, 8)}
    scaled = {u: 5 * v + 2 for u, v in t.items()}
    assert feature_loss(scaled, t) == pytest.approx(0.0, abs=1e-6)
    swapped = {"tumor": t["tme"], "tme": t["tumor"]}
    assert feature_loss(swapped, t) > 0.5


def test_distillation_total_and_no_teacher_gradient():
    s_logits = torch.randn(3, 4, requires_grad=True)
    t_logits = torch.randn(3, 4, requires_grad=True)
    feats = {"tumor": torch.randn(3, 8), "tme": torch.randn(3, 8)}
    t_feats = {u: torch.randn(3, 8, requires_grad=True) for u in feats}
    parts = distillation_loss(
        task_term=torch.tensor(1.0), student_logits=s_logits, teacher_logits=t_logits,
        student_features=feats, teacher_features=t_feats, task="classification",
    )
    torch.testing.assert_close(parts["total"], 1.0 + 0.01 * parts["kd"] + 0.01 * parts["feature"])
    parts["total"].backward()
    assert t_logits.grad is None and s_logits.grad is not None
    assert math.isfinite(float(parts["total"]))


def test_attention_loss_zero_on_the_teachers_maps_positive_otherwise_and_per_subspace():
    teacher = {u: torch.softmax(torch.randn(3, 9), -1) for u in ("tumor", "tme")}
    assert attention_loss(teacher, teacher) == pytest.approx(0.0, abs=1e-6)
    swapped = {"tumor": teacher["tme"], "tme": teacher["tumor"]}
    assert attention_loss(swapped, teacher) > 0.1
    # a student map with no weight where the teacher's has some is finite, and large
    blind = {u: torch.zeros(3, 9).index_fill(1, torch.tensor([0]), 1.0) for u in teacher}
    assert math.isfinite(float(attention_loss(blind, teacher))) and attention_loss(blind, teacher) > 5


def test_attention_loss_by_hand_with_padding():
    """KL(teacher || student) = sum_i t_i log(t_i / s_i); padded positions are 0 in both maps."""
    t = {"tumor": torch.tensor([[0.5, 0.5, 0.0]]), "tme": torch.tensor([[1.0, 0.0, 0.0]])}
    s = {"tumor": torch.tensor([[0.25, 0.75, 0.0]]), "tme": torch.tensor([[0.5, 0.5, 0.0]])}
    expected = 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75) + math.log(2)
    assert float(attention_loss(s, t)) == pytest.approx(expected, rel=1e-6)


def test_distillation_attention_term_reaches_the_student_only():
    s_att = {u: torch.softmax(torch.randn(2, 5), -1).requires_grad_(True) for u in ("tumor", "tme")}
    t_att = {u: torch.softmax(torch.randn(2, 5), -1).requires_grad_(True) for u in ("tumor", "tme")}
    feats = {"tumor": torch.randn(2, 8), "tme": torch.randn(2, 8)}
    common = dict(task_term=torch.tensor(1.0), student_logits=torch.randn(2, 4), teacher_logits=torch.randn(2, 4),
                  student_features=feats, teacher_features=feats, task="classification")
    parts = distillation_loss(**common, student_attention=s_att, teacher_attention=t_att, lambda_att=2.0)
    torch.testing.assert_close(parts["total"], 1.0 + 0.01 * parts["kd"] + 0.01 * parts["feature"]
                               + 2.0 * parts["attention"])
    parts["total"].backward()
    assert all(s_att[u].grad is not None and t_att[u].grad is None for u in s_att)
    assert float(distillation_loss(**common, student_attention=s_att, teacher_attention=t_att)["attention"]) == 0.0
