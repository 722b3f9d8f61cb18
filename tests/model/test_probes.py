"""Frozen linear paths (model/probes.py) in the teacher and the student."""

import numpy as np
import pytest
import torch

from napari_dismm.errors import DataError
from napari_dismm.model.checkpoint import load_model, save_model
from napari_dismm.model.probes import FrozenProbe, MapScorers, masked_mean, pooled_magnifications
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
    pooled = pooled_magnifications(bags, None, MAGS, probe.mean)
    torch.testing.assert_close(pooled[:, :D_IN], probe.mean[:D_IN].expand(2, D_IN))
    torch.testing.assert_close(pooled[:, D_IN:], bags["20x"].mean(1))
    empty = {m: torch.randn(2, 4, D_IN) for m in MAGS}
    masks = {"10x": torch.tensor([[True] * 4, [False] * 4]), "20x": torch.ones(2, 4, dtype=torch.bool)}
    pooled = pooled_magnifications(empty, masks, MAGS, probe.mean)  # slide 1 has no 10x patch
    torch.testing.assert_close(pooled[1, :D_IN], probe.mean[:D_IN])
    torch.testing.assert_close(pooled[0, :D_IN], empty["10x"][0].mean(0))


def test_masked_mean_reads_real_patches_only_and_set_fit_checks_shapes():
    bag = torch.tensor([[[1.0], [3.0], [100.0]]])
    torch.testing.assert_close(masked_mean(bag, torch.tensor([[True, True, False]])), torch.tensor([[2.0]]))
    with pytest.raises(DataError, match="shape"):
        FrozenProbe(4, 2).set_fit(mean=np.zeros(3), scale=np.ones(4), weight=np.zeros((2, 4)), bias=np.zeros(2))


def fitted_scorers(seed: int, context: float = 0.0) -> MapScorers:
    rng = np.random.default_rng(seed)
    scorers = MapScorers(len(MAGS), D_IN, context=context)
    scorers.set_fit(mean=rng.normal(size=(2, D_IN)), scale=rng.uniform(0.5, 2, size=(2, D_IN)),
                    weight=rng.normal(size=(2, 2, D_IN)))
    return scorers


def test_map_scores_pool_each_slide_by_the_softmax_of_standardised_scores():
    """Per magnification and subspace: softmax over the slide's real patches of
    ((x - mean) / scale) . w, pooling the raw features; padding changes nothing, and an
    unfitted scorer pools the mean (so it is the mean probe until fitted)."""
    scorers = fitted_scorers(0)
    raw = {m: [torch.randn(n, D_IN) for n in (7, 3)] for m in MAGS}
    bags = {m: torch.zeros(2, 9, D_IN) for m in MAGS}
    masks = {m: torch.zeros(2, 9, dtype=torch.bool) for m in MAGS}
    for m in MAGS:
        for b, x in enumerate(raw[m]):
            bags[m][b, :len(x)], masks[m][b, :len(x)] = x, True
            bags[m][b, len(x):] = 1e3  # padding that would dominate any pooling that read it
    fill = torch.zeros(len(MAGS) * 2 * D_IN)
    got = scorers(bags, masks, MAGS, fill)
    assert got.shape == (2, len(MAGS) * 2 * D_IN)
    for b in range(2):
        parts = []
        for i, m in enumerate(MAGS):
            z = (raw[m][b] - scorers.mean[i]) / scorers.scale[i]
            for u in range(2):
                parts.append(torch.softmax(z @ scorers.weight[i, u], dim=0) @ raw[m][b])
        torch.testing.assert_close(got[b], torch.cat(parts), rtol=1e-4, atol=1e-4)
    plain = MapScorers(len(MAGS), D_IN)(bags, masks, MAGS, fill)
    for b in range(2):
        want = torch.cat([raw[m][b].mean(0).repeat(2) for m in MAGS])
        torch.testing.assert_close(plain[b], want, rtol=1e-5, atol=1e-5)


def test_map_scores_fill_a_missing_magnification_and_an_empty_slide():
    scorers = fitted_scorers(1)
    fill = torch.arange(len(MAGS) * 2 * D_IN, dtype=torch.float32)
    bags = {"20x": torch.randn(2, 4, D_IN)}
    masks = {"20x": torch.tensor([[True] * 4, [False] * 4])}
    got = scorers(bags, masks, MAGS, fill)
    width = 2 * D_IN
    torch.testing.assert_close(got[:, :width], fill[:width].expand(2, width))  # no 10x in the batch
    torch.testing.assert_close(got[1, width:], fill[width:])  # slide 1 has no 20x patch
    assert torch.isfinite(got).all()
    with pytest.raises(DataError, match="shape"):
        scorers.set_fit(mean=np.zeros((2, D_IN)), scale=np.ones((2, D_IN)), weight=np.zeros((2, D_IN)))


def test_a_student_probe_on_teacher_maps_reads_mean_and_score_pooled_features(tmp_path):
    """``probe_pooling = "teacher_maps"``: the probe reads the mean features, then the
    score-pooled ones; the scorers are frozen buffers that travel with the checkpoint."""
    model = build("student", probe_pooling="teacher_maps").eval()
    assert model.slide_probe.weight.shape == (C, 3 * len(MAGS) * D_IN)
    random_fit(model.slide_probe, 2)
    scorers = fitted_scorers(3, context=model.config.probe_context)
    model.map_scorers.load_state_dict(scorers.state_dict())
    assert not any(name.startswith("map_scorers") for name, _ in model.named_parameters())
    batch = make_batch([7, 3], [9, 4], d_in=D_IN, n_tumor=N_T, n_tme=N_E, seed=4)
    width = len(MAGS) * D_IN
    inputs = model.probe_inputs(batch["bags"], batch["masks"], coords=batch["coords"])
    torch.testing.assert_close(inputs[:, :width], pooled_magnifications(batch["bags"], batch["masks"], MAGS,
                                                                         model.slide_probe.mean[:width]))
    steps = {m: torch.full((2,), 448.0 * 10 / float(m[:-1]), dtype=torch.float64) for m in MAGS}  # the default footprint
    torch.testing.assert_close(inputs[:, width:], scorers(batch["bags"], batch["masks"], MAGS,
                                                          model.slide_probe.mean[width:], coords=batch["coords"],
                                                          steps=steps))
    assert not torch.allclose(inputs[:, width:], scorers(batch["bags"], batch["masks"], MAGS,
                                                         model.slide_probe.mean[width:]))  # the context counts
    probe = model.slide_probe
    own, full = forward(model, batch, with_probes=False), forward(model, batch)
    added = full.per_magnification_logits["20x"] - own.per_magnification_logits["20x"]
    torch.testing.assert_close(added, ((inputs - probe.mean) / probe.scale) @ probe.weight.T + probe.bias,
                               rtol=1e-4, atol=1e-4)
    save_model(model, tmp_path / "m")
    loaded, doc = load_model(tmp_path / "m")
    assert doc["model"]["probe_pooling"] == "teacher_maps"
    torch.testing.assert_close(forward(loaded.eval(), batch).logits, forward(model, batch).logits)


def test_map_scores_read_each_patch_with_its_lattice_neighbourhood():
    """With context c the scores read and pool (1 - c) x_i + c mean(3 x 3 block of x_i), the
    block found on each bag's own footprint (a bag of a 0.25 um/px scanner has twice the
    level-0 step); padding is never a neighbour."""
    from napari_dismm.model.context import lattice_neighbour_mean

    scorers = fitted_scorers(6, context=0.5)
    x = torch.randn(2, 6, D_IN)
    grid = torch.tensor([[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]])
    coords = torch.stack([grid * 224, grid * 448])  # the same lattice at two footprints
    steps = torch.tensor([224.0, 448.0], dtype=torch.float64)
    mixed = scorers.mixed(x, coords, None, steps)
    for b in range(2):
        want = 0.5 * x[b] + 0.5 * lattice_neighbour_mean(x[b], coords[b], step=float(steps[b]))
        torch.testing.assert_close(mixed[b], want)
    torch.testing.assert_close(mixed[0], scorers.mixed(x[:1], coords[:1], None, steps[:1])[0])
    assert not torch.allclose(mixed, x)
    torch.testing.assert_close(scorers.mixed(x, None, None, steps), x)  # no coordinates: the patch alone
    padded = torch.cat([x[:1], torch.full((1, 3, D_IN), 1e3)], dim=1)
    where = torch.cat([coords[:1], torch.tensor([[[3 * 224, 0], [3 * 224, 224], [0, 2 * 224]]])], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 3])
    torch.testing.assert_close(scorers.mixed(padded, where, mask, steps[:1])[0, :6], mixed[0])
    # the forward pass mixes scores and weights instead of features: the same pooling
    fill = torch.zeros(len(MAGS) * 2 * D_IN)
    got = scorers({"20x": x}, None, ("10x", "20x"), fill, coords={"20x": coords}, steps={"20x": steps})
    for b in range(2):
        a = torch.softmax(scorers.scores(mixed[b], 1), dim=0)  # (N, 2)
        torch.testing.assert_close(got[b, 2 * D_IN:], (a.T @ mixed[b]).reshape(-1), rtol=1e-4, atol=1e-5)
    got = scorers({"20x": padded}, {"20x": mask}, ("10x", "20x"), fill, coords={"20x": where}, steps={"20x": steps[:1]})
    a = torch.softmax(scorers.scores(mixed[0], 1), dim=0)
    torch.testing.assert_close(got[0, 2 * D_IN:], (a.T @ mixed[0]).reshape(-1), rtol=1e-4, atol=1e-5)
