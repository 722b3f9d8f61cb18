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
    assert report.cosine < 0
    confident_tumor = conf[0] >= conf[1]
    assert report.projected == ("tme" if confident_tumor else "tumor")
    kept, moved, kept0 = (t1, e1, t0) if confident_tumor else (e1, t1, e0)
    assert torch.equal(kept, kept0)  # the confident block is untouched
    # orthogonal up to float32 round-off of the stored gradient
    assert abs(float(moved @ kept)) <= 1e-5 * norms + 1e-6


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
