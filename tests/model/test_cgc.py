"""CGC: projection properties (hypothesis), confidences by hand, and the DDP equivalence."""

import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_dismm.model.cgc import coordinate_gradients, subspace_confidences
from napari_dismm.model.heads import SubspaceFusionHead
from tests.model.ddp_cgc_worker import HeadOnly, head_data, step_head, step_teacher, teacher_and_data, worker

# --- projection properties ----------------------------------------------------------

shapes = st.tuples(st.integers(1, 5), st.integers(1, 6))  # (n_outputs, d)
values = st.floats(-10, 10, allow_nan=False, width=32)


@st.composite
def head_with_grad(draw):
    c, d = draw(shapes)
    grad = draw(st.lists(values, min_size=2 * c * d, max_size=2 * c * d))
    conf = draw(st.tuples(st.floats(0, 100), st.floats(0, 100)))
    head = SubspaceFusionHead(task="classification", d=d, n_outputs=max(c, 2))
    head.linear.weight.grad = torch.zeros_like(head.linear.weight)
    head.linear.weight.grad[:c] = torch.tensor(grad).view(c, 2 * d)
    return head, torch.tensor(conf, dtype=torch.float64)


@settings(max_examples=200, deadline=None)
@given(head_with_grad())
def test_projection_properties(case):
    head, conf = case
    d = head.d
    before = head.linear.weight.grad.clone()
    t0, e0 = before[:, :d].reshape(-1).double(), before[:, d:].reshape(-1).double()
    report = coordinate_gradients(head, conf)
    after = head.linear.weight.grad
    t1, e1 = after[:, :d].reshape(-1).double(), after[:, d:].reshape(-1).double()
    norms = float(t0.norm() * e0.norm())
    if norms == 0 or float(t0 @ e0) >= 0:
        assert report.projected is None
        assert torch.equal(after, before)
        return
    assert report.cosine < 0 and report.rows_projected == head.linear.weight.shape[0]
    confident_tumor = conf[0] >= conf[1]
    assert report.projected == ("tme" if confident_tumor else "tumor")
    kept, moved, kept0 = (t1, e1, t0) if confident_tumor else (e1, t1, e0)
    assert torch.equal(kept, kept0)  # the confident block is untouched
    # orthogonal up to float32 round-off of the stored gradient
    assert abs(float(moved @ kept)) <= 1e-5 * norms + 1e-6


@settings(max_examples=200, deadline=None)
@given(head_with_grad())
def test_row_projection_properties(case):
    """Row granularity (the reference's): each class row whose tumor and TME parts have a
    negative cosine has the less confident part made orthogonal to the other and rescaled
    to its norm; every other row, and the confident block, stay bit-identical."""
    head, conf = case
    d = head.d
    before = head.linear.weight.grad.clone()
    report = coordinate_gradients(head, conf, granularity="row")
    after = head.linear.weight.grad
    confident_tumor = conf[0] >= conf[1]
    kept0, moved0 = (before[:, :d], before[:, d:]) if confident_tumor else (before[:, d:], before[:, :d])
    kept1, moved1 = (after[:, :d], after[:, d:]) if confident_tumor else (after[:, d:], after[:, :d])
    assert torch.equal(kept1, kept0)
    dots = (kept0.double() * moved0.double()).sum(1)
    conflict = dots < 0
    assert report.rows_projected == int(conflict.sum())
    if not conflict.any():  # no-op when every row is aligned (or orthogonal, or zero)
        assert report.projected is None and torch.equal(after, before)
        return
    assert report.projected == ("tme" if confident_tumor else "tumor")
    assert torch.equal(moved1[~conflict], moved0[~conflict])
    for row in conflict.nonzero().squeeze(1).tolist():
        h, g0, g1 = kept0[row].double(), moved0[row].double(), moved1[row].double()
        scale = float(h.norm() * g0.norm())
        assert abs(float(g1 @ h)) <= 1e-5 * scale + 1e-6  # orthogonal to the confident row
        if g1.norm() > 0:  # rescaled to the norm it had (unless anti-parallel: then zero)
            assert float(g1.norm()) == pytest.approx(float(g0.norm()), rel=1e-5)
        if d == 1:  # a conflicting pair of scalars is anti-parallel: nothing orthogonal is left
            assert float(g1.norm()) == 0


def test_row_and_block_differ_where_the_blocks_agree_but_a_row_conflicts():
    """Row 0 conflicts, row 1 agrees strongly: the blocks' cosine is positive, so block CGC
    does nothing; row CGC fixes row 0 and leaves row 1."""
    grad = torch.tensor([[1.0, 0.0, -1.0, 1.0], [3.0, 0.0, 3.0, 0.0]])
    reports = {}
    for granularity in ("block", "row"):
        head = SubspaceFusionHead(task="classification", d=2, n_outputs=2)
        head.linear.weight.grad = grad.clone()
        reports[granularity] = coordinate_gradients(head, torch.tensor([5.0, 1.0]), granularity=granularity)
        if granularity == "block":
            assert reports["block"].projected is None and torch.equal(head.linear.weight.grad, grad)
        else:
            # row 0: g_E = (-1, 1), h = (1, 0): projected (0, 1), rescaled to |g_E| = sqrt 2
            torch.testing.assert_close(head.linear.weight.grad,
                                       torch.tensor([[1.0, 0.0, 0.0, 2**0.5], [3.0, 0.0, 3.0, 0.0]]))
    assert reports["block"].cosine > 0 and reports["row"].rows_projected == 1


def test_unknown_granularity_is_refused():
    head = SubspaceFusionHead(task="classification", d=2, n_outputs=2)
    with pytest.raises(ValueError, match="granularity"):
        coordinate_gradients(head, torch.tensor([1.0, 1.0]), granularity="class")


def test_projection_by_hand():
    head = SubspaceFusionHead(task="classification", d=2, n_outputs=2)
    head.linear.weight.grad = torch.tensor([[1.0, 0.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    report = coordinate_gradients(head, torch.tensor([5.0, 1.0]))  # tumor more confident
    assert report.projected == "tme"
    assert report.cosine == pytest.approx(-1 / 2**0.5)
    # g_E = (-1, 1, 0, 0), h = g_T = (1, 0, 0, 0): g_E - (-1) h = (0, 1, 0, 0)
    torch.testing.assert_close(head.linear.weight.grad, torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))


def test_confidences_by_hand():
    head = SubspaceFusionHead(task="survival", d=3, n_outputs=4)
    f_t, f_e = torch.randn(5, 3), torch.randn(5, 3)
    y = torch.tensor([0, 3, 1, 1, 2])
    conf = subspace_confidences(head, f_t, f_e, y, task="survival")
    w, b = head.linear.weight.detach(), head.linear.bias.detach()
    p_t = torch.softmax(f_t @ w[:, :3].T + b / 2, -1)
    p_e = torch.softmax(f_e @ w[:, 3:].T + b / 2, -1)
    torch.testing.assert_close(conf.float(), torch.stack([p_t[range(5), y].sum(), p_e[range(5), y].sum()]))


# --- DDP: two gloo processes == one process on the whole batch --------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cgc_under_ddp_equals_single_process(tmp_path):
    mp.spawn(worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    f_t, f_e, y = head_data()
    torch.manual_seed(0)
    single = HeadOnly()
    report = step_head(single, f_t, f_e, y, single.fusion_heads)
    assert report.projected is not None  # the case really exercises the projection
    local = subspace_confidences(single.head, f_t[4:], f_e[4:], y[4:], task="classification")
    assert (local[0] >= local[1]) != (report.projected == "tme")  # and needs the all-reduce
    for rank in range(2):
        torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / f"head_{rank}.npy")), single.head.linear.weight.grad, atol=1e-6, rtol=1e-5)
        cos, proj_tme = np.load(tmp_path / f"head_report_{rank}.npy")
        assert cos == pytest.approx(report.cosine, abs=1e-6)
        assert bool(proj_tme) == (report.projected == "tme")

    model, batch, yt = teacher_and_data()
    step_teacher(model, batch, yt, torch.arange(4), model.fusion_heads)
    for rank in range(2):
        saved = np.load(tmp_path / f"teacher_{rank}.npz")
        for name, p in model.named_parameters():
            torch.testing.assert_close(torch.from_numpy(saved[name]), p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_cgc_step_disabled_changes_nothing():
    from napari_dismm.model.cgc import CGCStep

    f_t, f_e, y = head_data()
    torch.manual_seed(0)
    model = HeadOnly()
    cgc = CGCStep(model.fusion_heads, task="classification", enabled=False)
    cgc.observe({"10x": {"tumor": f_t, "tme": f_e}}, y)
    torch.nn.functional.cross_entropy(model(f_t, f_e), y).backward()
    before = model.head.linear.weight.grad.clone()
    assert cgc.apply() == {} and torch.equal(model.head.linear.weight.grad, before)
