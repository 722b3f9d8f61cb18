"""Frozen linear paths (model/probes.py) in the teacher and the student."""

import numpy as np
import pytest
import torch

from napari_dismm.errors import DataError
from napari_dismm.model.checkpoint import load_model, save_model
from napari_dismm.model.probes import FrozenProbe, masked_mean, pooled_magnifications
from napari_dismm.model.student import Student, StudentConfig
from napari_dismm.model.teacher import Teacher, TeacherConfig
from tests.model.model_helpers import make_batch, single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

D_IN, N_T, N_E, C = 12, 5, 7, 3
MAGS = ("10x", "20x")


def build(kind: str, **kw):
    common = dict(n_outputs=C, d_in=D_IN, d=16, dropout=0.0, probes=True, **kw)
    if kind == "teacher":
        return Teacher(TeacherConfig(n_tumor_genes=N_T, n_tme_genes=N_E, n_heads=4, gene_dropout=0.0, **common))
    return Student(StudentConfig(n_heads=4, n_anchors=16, **common))


def random_fit(probe: FrozenProbe, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_out, n_in = probe.weight.shape
    probe.set_fit(mean=rng.normal(size=n_in), scale=rng.uniform(0.5, 2, size=n_in),
                  weight=rng.normal(size=(n_out, n_in)), bias=rng.normal(size=n_out))


def forward(model, batch, **kw):
    return model(batch["bags"], coords=batch["coords"], masks=batch["masks"], genes=batch["genes"], **kw)


def expected_probe_logits(model, batch) -> torch.Tensor:
    """What the probes should add, from the unpadded bags (numpy-free reference)."""
    means = torch.cat([torch.stack([b.mean(0) for b in batch["raw"][m]]) for m in MAGS], dim=1)
    slide = model.slide_probe
    out = ((means - slide.mean) / slide.scale) @ slide.weight.T + slide.bias
    if hasattr(model, "gene_probe"):
        g = torch.cat([batch["genes"]["tumor"], batch["genes"]["tme"]], dim=1)
        gp = model.gene_probe
        out = out + ((g - gp.mean) / gp.scale) @ gp.weight.T + gp.bias
    return out


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_the_prediction_is_the_models_own_logits_plus_its_probes(kind):
    """Every magnification's logits are the model's own (``with_probes=False``, what training
    reads) plus the probes' (mean over the real patches only, padding ignored); unfitted
    probes add 0; the maps do not depend on the probes."""
    torch.manual_seed(0)
    model = build(kind).eval()
    batch = make_batch([5, 9, 1], [13, 2, 30], d_in=D_IN, n_tumor=N_T, n_tme=N_E)
    with torch.no_grad():
        own = forward(model, batch, with_probes=False)
        torch.testing.assert_close(forward(model, batch).logits, own.logits)
        random_fit(model.slide_probe, 1)
        if kind == "teacher":
            random_fit(model.gene_probe, 2)
        out = forward(model, batch)
    want = expected_probe_logits(model, batch)
    assert float(want.abs().mean()) > 0.1
    for mag in MAGS:
        torch.testing.assert_close(out.per_magnification_logits[mag], own.per_magnification_logits[mag] + want,
                                   atol=1e-4, rtol=1e-4)
        for u in ("tumor", "tme"):
            torch.testing.assert_close(out.attention[mag][u], own.attention[mag][u])


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_no_optimiser_moves_the_probes(kind):
    """The probes are buffers, not parameters: a training step on the prediction leaves them."""
    torch.manual_seed(0)
    model = build(kind).train()
    random_fit(model.slide_probe, 1)
    batch = make_batch([6, 7], [8, 9], d_in=D_IN, n_tumor=N_T, n_tme=N_E)
    assert not any("probe" in name for name, _ in model.named_parameters())
    before = model.slide_probe.weight.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(forward(model, batch).logits, torch.tensor([0, 1])).backward()
    opt.step()
    torch.testing.assert_close(model.slide_probe.weight, before)


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_probes_round_trip_through_a_checkpoint(kind, tmp_path):
    torch.manual_seed(0)
    model = build(kind).eval()
    random_fit(model.slide_probe, 3)
    if kind == "teacher":
        random_fit(model.gene_probe, 4)
    save_model(model, tmp_path)
    loaded, _ = load_model(tmp_path)
    batch = make_batch([5, 9], [13, 2], d_in=D_IN, n_tumor=N_T, n_tme=N_E)
    with torch.no_grad():
        torch.testing.assert_close(forward(loaded.eval(), batch).logits, forward(model, batch).logits)


def test_a_missing_magnification_adds_nothing_through_the_probe():
    """A batch without one magnification, or a slide without a patch at it: that part of the
    probe's input is its training mean, so only the present features move its logits."""
    probe = FrozenProbe(2 * D_IN, C)
    random_fit(probe, 5)
    bags = {"20x": torch.randn(2, 4, D_IN)}
    pooled = pooled_magnifications(bags, None, MAGS, probe)
    torch.testing.assert_close(pooled[:, :D_IN], probe.mean[:D_IN].expand(2, D_IN))
    torch.testing.assert_close(pooled[:, D_IN:], bags["20x"].mean(1))
    empty = {m: torch.randn(2, 4, D_IN) for m in MAGS}
    masks = {"10x": torch.tensor([[True] * 4, [False] * 4]), "20x": torch.ones(2, 4, dtype=torch.bool)}
    pooled = pooled_magnifications(empty, masks, MAGS, probe)  # slide 1 has no 10x patch
    torch.testing.assert_close(pooled[1, :D_IN], probe.mean[:D_IN])
    torch.testing.assert_close(pooled[0, :D_IN], empty["10x"][0].mean(0))


def test_masked_mean_reads_real_patches_only_and_set_fit_checks_shapes():
    bag = torch.tensor([[[1.0], [3.0], [100.0]]])
    torch.testing.assert_close(masked_mean(bag, torch.tensor([[True, True, False]])), torch.tensor([[2.0]]))
    with pytest.raises(DataError, match="shape"):
        FrozenProbe(4, 2).set_fit(mean=np.zeros(3), scale=np.ones(4), weight=np.zeros((2, 4)), bias=np.zeros(2))
