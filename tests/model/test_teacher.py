"""Teacher and baselines: shapes, padding/masking, order invariance, memorisation."""

import pytest
import torch

from napari_dismm.errors import DataError, ModelConfigError
from napari_dismm.model.baselines import GenesOnly, GenesOnlyConfig, ABMIL, ABMILConfig, LateFusion, LateFusionConfig
from napari_dismm.model.losses import task_loss
from napari_dismm.model.teacher import Teacher, TeacherConfig
from tests.model.model_helpers import make_batch, single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

D_IN, N_T, N_E = 12, 5, 7


def build(kind: str, task: str = "classification", dropout: float = 0.0, **kw):
    common = dict(task=task, n_outputs=3 if task == "classification" else 4, d_in=D_IN, d=16, dropout=dropout, **kw)
    if kind == "teacher":
        return Teacher(TeacherConfig(n_tumor_genes=N_T, n_tme_genes=N_E, n_heads=4, gene_dropout=dropout, **common))
    if kind == "abmil":
        return ABMIL(ABMILConfig(**common))
    if kind == "genes_only":
        return GenesOnly(GenesOnlyConfig(n_tumor_genes=N_T, n_tme_genes=N_E, **common))
    return LateFusion(LateFusionConfig(n_tumor_genes=N_T, n_tme_genes=N_E, **common))


KINDS = ["teacher", "abmil", "late_fusion", "genes_only"]


def open_gates(model: Teacher) -> Teacher:
    """Gene gates fully open, x 1 (they start at 0): for tests of what the genes reach, not of
    the start."""
    from napari_dismm.model.teacher import GATE_GAIN

    with torch.no_grad():
        for gate in model.gene_gates.values():
            gate.fill_(1.0 / GATE_GAIN)
    return model


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("task", ["classification", "survival"])
def test_padded_batch_equals_one_by_one(kind, task):
    torch.manual_seed(0)
    model = build(kind, task, dropout=0.25).eval()
    batch = make_batch([5, 9, 1], [13, 2, 30], d_in=D_IN, n_tumor=N_T, n_tme=N_E)
    with torch.no_grad():
        out = model(batch["bags"], coords=batch["coords"], masks=batch["masks"], genes=batch["genes"])
        for i in range(3):
            single = model(
                {m: batch["raw"][m][i][None] for m in ("10x", "20x")},
                coords={m: batch["raw_coords"][m][i][None] for m in ("10x", "20x")},
                genes={u: g[i : i + 1] for u, g in batch["genes"].items()},
            )
            torch.testing.assert_close(out.logits[i], single.logits[0], atol=1e-5, rtol=0)
            for mag in ("10x", "20x"):
                n = batch["raw"][mag][i].shape[0]
                for name, att in out.attention[mag].items():
                    torch.testing.assert_close(att[i, :n], single.attention[mag][name][0], atol=1e-5, rtol=0)
                    assert torch.all(att[i, n:] == 0)
                    torch.testing.assert_close(att[i].sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    if task == "classification":
        assert out.probabilities.shape == (3, 3) and out.risk is None
    else:
        assert out.hazards.shape == out.survival.shape == (3, 4) and out.risk.shape == (3,)


@pytest.mark.parametrize("kind", KINDS)
def test_patch_order_does_not_matter(kind):
    torch.manual_seed(1)
    model = build(kind).eval()
    batch = make_batch([20], [40], d_in=D_IN, n_tumor=N_T, n_tme=N_E)
    perm = {"10x": torch.randperm(20), "20x": torch.randperm(40)}
    with torch.no_grad():
        a = model(batch["bags"], coords=batch["coords"], genes=batch["genes"])
        b = model({m: x[:, perm[m]] for m, x in batch["bags"].items()},
                  coords={m: c[:, perm[m]] for m, c in batch["coords"].items()}, genes=batch["genes"])
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    for mag in perm:
        for name in a.attention[mag]:
            torch.testing.assert_close(a.attention[mag][name][:, perm[mag]], b.attention[mag][name], atol=1e-6, rtol=0)


def test_teacher_output_layout_and_one_magnification():
    model = build("teacher").eval()
    batch = make_batch([4, 6], [8, 3], d_in=D_IN, n_tumor=N_T, n_tme=N_E)
    out = model(batch["bags"], coords=batch["coords"], masks=batch["masks"], genes=batch["genes"])
    assert set(out.attention) == {"10x", "20x"} and set(out.attention["10x"]) == {"tumor", "tme"}
    assert out.features["20x"]["tme"].shape == (2, 16)
    assert out.per_magnification_logits["10x"].shape == (2, 3)
    only = model({"20x": batch["bags"]["20x"]}, coords=batch["coords"], masks=batch["masks"], genes=batch["genes"])
    torch.testing.assert_close(only.logits, out.per_magnification_logits["20x"])


def test_teacher_input_errors_are_clear():
    model = build("teacher")
    batch = make_batch([4], [8], d_in=D_IN, n_tumor=N_T, n_tme=N_E)
    with pytest.raises(DataError, match="gene expression"):
        model(batch["bags"])
    with pytest.raises(DataError, match="unknown magnification"):
        model({"40x": batch["bags"]["10x"]}, genes=batch["genes"])
    with pytest.raises(DataError, match=r"\(B, N, 12\)"):
        model({"10x": torch.randn(1, 4, 3)}, genes=batch["genes"])
    with pytest.raises(DataError, match="tme"):
        model(batch["bags"], genes={"tumor": batch["genes"]["tumor"], "tme": torch.randn(1, 2)})


def test_abmil_attention_is_one_map():
    model = build("abmil").eval()
    batch = make_batch([4, 6], [8, 3], d_in=D_IN, n_tumor=N_T, n_tme=N_E)
    out = model(batch["bags"], masks=batch["masks"])
    assert set(out.attention["10x"]) == {"abmil"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("task", ["classification", "survival"])
def test_memorises_a_tiny_set(kind, task):
    """Gradient check: 8 bags, 200 Adam steps, the training loss goes to ~0."""
    torch.manual_seed(2)
    model = build(kind, task).train()
    batch = make_batch([10, 14, 8, 20, 12, 9, 16, 11], [25, 30, 18, 40, 22, 19, 35, 28], d_in=D_IN, n_tumor=N_T, n_tme=N_E, seed=3)
    target = torch.arange(8) % (3 if task == "classification" else 4)
    events = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1])
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        out = model(batch["bags"], coords=batch["coords"], masks=batch["masks"], genes=batch["genes"])
        if float(task_loss(out.logits, target, task=task, events=events)) < 0.01:
            break
        # train every magnification's logits (as the trainer does) plus the combined ones
        loss = sum(task_loss(l, target, task=task, events=events) for l in out.per_magnification_logits.values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        final = task_loss(model(batch["bags"], coords=batch["coords"], masks=batch["masks"], genes=batch["genes"]).logits, target, task=task, events=events)
    assert final < 0.05, float(final)


def test_teacher_dev_loss_end_to_end():
    """DEV on a real teacher output: coordinates from one shuffled lattice per slide,
    20x patches are the quarters of the 10x ones; gradients reach both magnifications."""
    from napari_dismm.model.losses import dev_loss_from_output
    from tests.model.model_helpers import grid_coords, pad_bags

    torch.manual_seed(4)
    model = open_gates(build("teacher"))  # a zero query would make every map uniform
    quarters = torch.tensor([[0, 0], [224, 0], [0, 224], [224, 224]], dtype=torch.float64)
    c10 = [grid_coords(n, 448, seed=n) for n in (6, 9, 4)]
    c20 = [(c[:, None] + quarters[None]).reshape(-1, 2) for c in c10]
    coords = {"10x": pad_bags(c10)[0], "20x": pad_bags(c20)[0]}
    batch = make_batch([6, 9, 4], [24, 36, 16], d_in=D_IN, n_tumor=N_T, n_tme=N_E)
    out = model(batch["bags"], coords=coords, masks=batch["masks"], genes=batch["genes"])
    loss = dev_loss_from_output(out, coords, batch["masks"], patch_size_10x_level0=448)
    assert loss > 0
    loss.backward()
    for mag in ("10x", "20x"):
        assert model.dmf[mag]["tumor"].to_kv.weight.grad.abs().sum() > 0
    with pytest.raises(DataError, match="20x"):
        dev_loss_from_output(out, {"10x": coords["10x"]}, batch["masks"], patch_size_10x_level0=448)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_and_fully_masked_bags_stay_finite(kind):
    model = build(kind).eval()
    genes = {"tumor": torch.randn(2, N_T), "tme": torch.randn(2, N_E)}
    masks = {"20x": torch.tensor([[True, True, False], [False, False, False]])}
    with torch.no_grad():
        coords = {"10x": torch.zeros(2, 0, 2), "20x": torch.tensor([[[0, 0], [224, 0], [0, 0]]] * 2)}
        out = model({"10x": torch.randn(2, 0, D_IN), "20x": torch.randn(2, 3, D_IN)}, coords=coords, masks=masks,
                    genes=genes)
    assert torch.isfinite(out.logits).all()
    for att in out.attention["20x"].values():
        assert torch.equal(att[1], torch.zeros(3)) and att[0, 2] == 0


def test_teacher_without_subspace_split_shares_one_gene_query():
    """The no-split ablation: one gene encoder over all genes; changing a TME gene moves the
    tumor attention too (with the split it cannot)."""
    torch.manual_seed(0)
    batch = make_batch([10, 14], [25, 30], d_in=D_IN, n_tumor=N_T, n_tme=N_E, seed=1)
    moved = {"tumor": batch["genes"]["tumor"], "tme": batch["genes"]["tme"] + 1.0}
    for split in (True, False):
        model = open_gates(build("teacher", subspace_split=split)).eval()
        assert set(model.gene_encoders) == ({"tumor", "tme"} if split else {"all"})
        with torch.no_grad():
            a = model(batch["bags"], coords=batch["coords"], masks=batch["masks"], genes=batch["genes"]).attention["10x"]["tumor"]
            b = model(batch["bags"], coords=batch["coords"], masks=batch["masks"], genes=moved).attention["10x"]["tumor"]
        assert torch.allclose(a, b) == split


# --- spatial context (model/context.py) -----------------------------------------------------


def test_neighbour_mean_by_hand_and_in_any_order():
    from napari_dismm.model.context import lattice_neighbour_mean

    # an L of three patches and one far away: (0,0) (1,0) (0,1) on a 100 px lattice, (5,5)
    coords = torch.tensor([[1000, 2000], [1100, 2000], [1000, 2100], [1500, 2500]])
    tokens = torch.tensor([[1.0], [2.0], [4.0], [8.0]])
    expected = torch.tensor([[7 / 3], [7 / 3], [7 / 3], [8.0]])  # all three touch; the far one is alone
    torch.testing.assert_close(lattice_neighbour_mean(tokens, coords, step=100), expected)
    perm = torch.tensor([3, 1, 0, 2])
    torch.testing.assert_close(lattice_neighbour_mean(tokens[perm], coords[perm], step=100), expected[perm])
    # a diagonal step is a neighbour, two steps are not
    diag = lattice_neighbour_mean(torch.tensor([[0.0], [6.0], [9.0]]), torch.tensor([[0, 0], [100, 100], [300, 0]]), step=100)
    torch.testing.assert_close(diag, torch.tensor([[3.0], [3.0], [9.0]]))


def test_spatial_context_changes_the_maps_needs_coords_and_is_off_for_old_teachers():
    torch.manual_seed(4)
    batch = make_batch([9, 12], [20, 16], d_in=D_IN, n_tumor=N_T, n_tme=N_E, seed=2)
    on, off = open_gates(build("teacher")).eval(), build("teacher", spatial_context=0.0).eval()
    off.load_state_dict(on.state_dict())
    with torch.no_grad():
        a = on(batch["bags"], coords=batch["coords"], masks=batch["masks"], genes=batch["genes"])
        b = off(batch["bags"], masks=batch["masks"], genes=batch["genes"])  # no coords needed when off
        # what the context does, by hand: tokens mixed half-half with their neighbourhood mean
        from napari_dismm.model.context import with_context

        tokens = on.embed["10x"](batch["bags"]["10x"])
        mixed = with_context(tokens, batch["coords"]["10x"], batch["masks"]["10x"], step=448.0, weight=0.5)
        _, expected = on.dmf["10x"]["tumor"](on._queries(batch["genes"])["tumor"], mixed, batch["masks"]["10x"])
    torch.testing.assert_close(a.attention["10x"]["tumor"], expected)
    assert not torch.allclose(a.attention["10x"]["tumor"], b.attention["10x"]["tumor"])
    with pytest.raises(DataError, match="coordinates"):
        on(batch["bags"], masks=batch["masks"], genes=batch["genes"])
    with pytest.raises(ModelConfigError, match="spatial_context"):
        build("teacher", spatial_context=1.5)


def fit_on_uniform_bags(model: Teacher, batch: dict) -> tuple[dict, dict, torch.Tensor]:
    """Every bag one repeated patch (pooled slide features cannot differ between samples),
    labels 0-2 by position; 150 Adam steps. Returns (bags, masks, target)."""
    bags = {m: b[:1, :1].expand_as(b).clone() for m, b in batch["bags"].items()}
    masks = {m: torch.ones(b.shape[:2], dtype=torch.bool) for m, b in bags.items()}
    target = torch.arange(len(next(iter(bags.values())))) % 3
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        out = model(bags, masks=masks, genes=batch["genes"])
        loss = sum(task_loss(l, target, task="classification") for l in out.per_magnification_logits.values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return bags, masks, target


@pytest.mark.parametrize("gene_residual", [True, False])
def test_the_prediction_reads_the_expression_only_with_the_gene_residual(gene_residual):
    """Every bag the same (one repeated patch): pooled slide features cannot differ between
    samples, so labels that follow the genes can be fitted only if the genes reach the head
    (issue 13: a teacher whose genes only chose where to look lost to expression alone)."""
    torch.manual_seed(0)
    model = build("teacher", gene_residual=gene_residual, spatial_context=0.0).train()
    batch = make_batch([6] * 8, [9] * 8, d_in=D_IN, n_tumor=N_T, n_tme=N_E, seed=1)
    bags, masks, target = fit_on_uniform_bags(model, batch)
    with torch.no_grad():
        final = float(task_loss(model(bags, masks=masks, genes=batch["genes"]).logits, target, task="classification"))
    assert (final < 0.05) if gene_residual else (final > 0.5), final


def test_slide_head_reads_the_slide_features_alone():
    """The slide-only logits (what keeps the maps finding the label's patches) do not move
    when only the gene residual would move them: with uniform bags they are one row for all."""
    torch.manual_seed(0)
    model = open_gates(build("teacher", spatial_context=0.0)).eval()
    batch = make_batch([6] * 4, [9] * 4, d_in=D_IN, n_tumor=N_T, n_tme=N_E, seed=1)
    bags = {m: b[:1, :1].expand_as(b).clone() for m, b in batch["bags"].items()}
    masks = {m: torch.ones(b.shape[:2], dtype=torch.bool) for m, b in bags.items()}
    out = model(bags, masks=masks, genes=batch["genes"])
    for mag in bags:
        slide = out.extras[f"slide_logits.{mag}"]
        torch.testing.assert_close(slide, slide[:1].expand_as(slide))
        assert not torch.allclose(out.per_magnification_logits[mag], out.per_magnification_logits[mag][:1])


def test_gene_gates_start_closed_and_open_by_training():
    """At initialisation the teacher reads the slide alone (the genes' gates are 0, issue 13:
    noise genes let the fused head memorise patients before the slide was read); the gates
    get gradients, so labels that only the genes carry still open them."""
    torch.manual_seed(0)
    model = build("teacher", spatial_context=0.0).train()
    batch = make_batch([6] * 8, [9] * 8, d_in=D_IN, n_tumor=N_T, n_tme=N_E, seed=1)
    shuffled = {u: g.flip(0) for u, g in batch["genes"].items()}
    with torch.no_grad():
        model.eval()
        a = model(batch["bags"], masks=batch["masks"], genes=batch["genes"]).logits
        b = model(batch["bags"], masks=batch["masks"], genes=shuffled).logits
        model.train()
    torch.testing.assert_close(a, b)
    bags, masks, target = fit_on_uniform_bags(model, batch)
    assert min(abs(float(model.gene_gates[f"residual_{u}"])) for u in ("tumor", "tme")) > 0.02
    with torch.no_grad():
        assert float(task_loss(model(bags, masks=masks, genes=batch["genes"]).logits, target,
                               task="classification")) < 0.05


def test_format_3_teachers_load_without_gates(tmp_path):
    """A teacher saved before the gates (format 3) loads as trained: ungated genes."""
    import json

    from napari_dismm.model.checkpoint import load_model, save_model

    model = build("teacher", gene_gate=False).eval()
    save_model(model, tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    doc["format_version"] = 3
    del doc["model"]["gene_gate"]
    (tmp_path / "config.json").write_text(json.dumps(doc))
    loaded, _ = load_model(tmp_path)
    assert loaded.config.gene_gate is False and not hasattr(loaded, "gene_gates")
