"""The WSI-only student: shapes, masking, one magnification, permutation, subspace
prototypes, config and checkpoint round trips, and memorising a tiny training set."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from napari_dismm.errors import DataError, ModelConfigError
from napari_dismm.model.config import config_to_dict
from napari_dismm.model.losses import task_loss
from napari_dismm.model.registry import build_model, config_from_dict
from napari_dismm.model.student import Student, StudentConfig
from tests.model.model_helpers import grid_coords, pad_bags, single_thread  # noqa: F401

D_IN = 24


def small_config(**kw) -> StudentConfig:
    base = dict(task="classification", n_outputs=3, d_in=D_IN, d=16, n_heads=2, dropout=0.0)
    base.update(kw)
    return StudentConfig(**base)


def make_student(**kw) -> Student:
    torch.manual_seed(0)
    return Student(small_config(**kw)).eval()


def batch(sizes: list[int], *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    torch.manual_seed(seed)
    raw = [torch.randn(n, D_IN) for n in sizes]
    bags, mask = pad_bags(raw)
    coords = torch.zeros(len(sizes), bags.shape[1], 2, dtype=torch.float64)
    for i, n in enumerate(sizes):
        coords[i, :n] = grid_coords(n, 224.0, seed=seed + i)
    return bags, mask, coords, raw


@pytest.mark.parametrize("task", ["classification", "survival"])
def test_shapes_and_derived_outputs(task: str) -> None:
    model = make_student(task=task, n_outputs=4)
    b10, m10, c10, _ = batch([30, 17, 5])
    b20, m20, c20, _ = batch([60, 41, 9], seed=1)
    out = model({"10x": b10, "20x": b20}, coords={"10x": c10, "20x": c20}, masks={"10x": m10, "20x": m20})
    assert out.logits.shape == (3, 4)
    assert set(out.per_magnification_logits) == {"10x", "20x"}
    for mag, mask in (("10x", m10), ("20x", m20)):
        ita = out.ita[mag]
        n_max = mask.shape[1]
        assert ita.cluster.shape == ita.is_centre.shape == ita.weight.shape == (3, n_max)
        assert ita.merged.shape == (3, 2, 16) and ita.subspace.shape == (3, 2)
        assert torch.all(ita.cluster[~mask] == -1) and torch.all(ita.cluster[mask] >= 0)
        assert torch.equal(ita.is_centre.sum(1), torch.tensor([2, 2, 2]))
        for u in ("tumor", "tme"):
            att = out.attention[mag][u]
            torch.testing.assert_close(att.sum(1), torch.ones(3))
            assert torch.all(att[~mask] == 0)
            assert out.features[mag][u].shape == (3, 16)
        # one merged token per subspace (K = 2): f_u is that token
        for i in range(3):
            tumor_cluster = int((ita.subspace[i] == 0).nonzero())
            torch.testing.assert_close(out.features[mag]["tumor"][i], ita.merged[i, tumor_cluster])
    if task == "classification":
        torch.testing.assert_close(out.probabilities.sum(1), torch.ones(3))
    else:
        assert out.hazards.shape == out.survival.shape == (3, 4) and out.risk.shape == (3,)
        assert torch.all(out.survival[:, 1:] <= out.survival[:, :-1])


def test_padded_batch_equals_bags_run_one_by_one() -> None:
    model = make_student()
    bags, mask, coords, raw = batch([40, 12, 25])
    out = model({"20x": bags}, coords={"20x": coords}, masks={"20x": mask})
    for i, x in enumerate(raw):
        n = x.shape[0]
        alone = model({"20x": x[None]}, coords={"20x": coords[i : i + 1, :n]})
        torch.testing.assert_close(out.logits[i], alone.logits[0])
        for u in ("tumor", "tme"):
            torch.testing.assert_close(out.attention["20x"][u][i, :n], alone.attention["20x"][u][0])
        assert torch.equal(out.ita["20x"].cluster[i, :n], alone.ita["20x"].cluster[0])


def test_one_magnification_is_enough_and_errors_are_clear() -> None:
    model = make_student()
    bags, mask, coords, _ = batch([20, 8])
    out = model({"10x": bags}, masks={"10x": mask})  # no coords either
    assert list(out.per_magnification_logits) == ["10x"]
    torch.testing.assert_close(out.logits, out.per_magnification_logits["10x"])
    with pytest.raises(DataError, match="unknown magnification"):
        model({"40x": bags})
    with pytest.raises(DataError, match=f"\\(B, N, {D_IN}\\)"):
        model({"10x": torch.randn(1, 5, D_IN + 1)})
    with pytest.raises(DataError, match="coords"):
        model({"10x": bags}, coords={"10x": coords[:, :3]})


def test_permuting_patches_permutes_outputs_and_keeps_logits() -> None:
    model = make_student()
    x, _, xy, _ = batch([300])
    perm = torch.randperm(300)
    out = model({"20x": x}, coords={"20x": xy})
    moved = model({"20x": x[:, perm]}, coords={"20x": xy[:, perm]})
    assert torch.equal(moved.logits, out.logits)  # canonical order: bit-identical
    ita, ita_p = out.ita["20x"], moved.ita["20x"]
    assert torch.equal(ita_p.cluster, ita.cluster[:, perm])
    assert torch.equal(ita_p.is_centre, ita.is_centre[:, perm])
    assert torch.equal(ita_p.weight, ita.weight[:, perm])
    assert torch.equal(ita_p.merged, ita.merged)
    for u in ("tumor", "tme"):
        assert torch.equal(moved.attention["20x"][u], out.attention["20x"][u][:, perm])


def test_approximate_path_runs_on_a_bag_larger_than_anchors_and_candidates() -> None:
    model = make_student(n_anchors=64, n_candidates=32, chunk_size=500)
    x = torch.randn(1, 3000, D_IN)
    with torch.no_grad():
        out = model({"20x": x})
    assert int(out.ita["20x"].is_centre.sum()) == 2
    assert torch.isfinite(out.logits).all()


def test_prototypes_decide_the_mapping_and_survive_a_checkpoint(tmp_path) -> None:
    from napari_dismm.model.checkpoint import load_model, save_model

    model = make_student()
    x, _, xy, _ = batch([50])
    before = model({"20x": x}, coords={"20x": xy})
    merged = before.ita["20x"].merged[0]
    assert not model.prototypes_set.any()
    # prototypes equal to the two merged tokens pin the mapping; swapping them swaps it
    model.set_subspace_prototypes(merged[1], merged[0], magnification="20x")
    out = model({"20x": x}, coords={"20x": xy})
    assert out.ita["20x"].subspace[0].tolist() == [1, 0]
    model.set_subspace_prototypes(merged[0], merged[1])
    swapped = model({"20x": x}, coords={"20x": xy})
    assert swapped.ita["20x"].subspace[0].tolist() == [0, 1]
    torch.testing.assert_close(swapped.features["20x"]["tumor"], out.features["20x"]["tme"])
    assert model.prototypes_set.all()
    with pytest.raises(ModelConfigError):
        model.set_subspace_prototypes(torch.zeros(3), torch.zeros(3))

    save_model(model, tmp_path / "student")
    loaded, _ = load_model(tmp_path / "student")
    assert isinstance(loaded, Student)
    torch.testing.assert_close(loaded.prototypes, model.prototypes)
    again = loaded.eval()({"20x": x}, coords={"20x": xy})
    torch.testing.assert_close(again.logits, swapped.logits)


def test_config_round_trips_through_json_and_registry() -> None:
    config = small_config(magnifications=("20x",), k=3, combine="mean")
    data = json.loads(json.dumps(config_to_dict(config)))
    rebuilt = config_from_dict(data, strict=True)
    assert rebuilt == config
    assert dataclasses.asdict(rebuilt)["magnifications"] == ("20x",)
    assert isinstance(build_model(data), Student)
    bad_values = ({"k": 0}, {"n_candidates": 1, "k": 2}, {"d": 10, "n_heads": 4}, {"combine": "vote"}, {"kind": "x"})
    for bad in bad_values:
        with pytest.raises(ModelConfigError):
            small_config(**bad)


def test_an_all_padding_bag_gives_finite_output() -> None:
    model = make_student()
    bags, mask, _, _ = batch([10, 3])
    mask[1] = False
    out = model({"10x": bags}, masks={"10x": mask})
    assert torch.isfinite(out.logits).all()
    assert torch.all(out.attention["10x"]["tumor"][1] == 0)


@pytest.mark.parametrize("task", ["classification", "survival"])
def test_memorises_a_tiny_training_set(task: str, single_thread) -> None:  # noqa: F811
    """8 bags of 50 tokens, 120 Adam steps (the loss is ~1e-3 by step 40-60): gradients
    reach every part that matters."""
    torch.manual_seed(0)
    model = Student(small_config(task=task, n_outputs=4, magnifications=("20x",), d=32))
    bags = torch.randn(8, 50, D_IN)
    xy = torch.stack([grid_coords(50, 224.0, seed=i) for i in range(8)])
    target = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    events = torch.tensor([1, 1, 1, 1, 1, 0, 1, 0])
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        out = model({"20x": bags}, coords={"20x": xy})
        loss = task_loss(out.logits, target, task=task, events=events)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        final = task_loss(model({"20x": bags}, coords={"20x": xy}).logits, target, task=task, events=events)
    assert final.item() < 0.05
    assert model.branches["20x"].ita.scorer.weight.grad.abs().sum() > 0


def test_in_place_embedding_draws_the_same_dropout_as_the_gathered_one() -> None:
    """A bag whose real rows are a prefix is embedded in place (no gathered copy of the input
    kept for the backward); in training mode it must give exactly the tokens, and so the ITA,
    of the gathered path, dropout masks included."""
    student = make_student(dropout=0.3, chunk_size=7).train()
    branch = next(iter(student.branches.values()))
    x = torch.randn(20, student.config.d_in)
    coords = grid_coords(20, 224.0).float()
    prototypes = torch.randn(2, student.config.d)
    shifted = torch.cat([torch.randn(1, x.shape[1]), x])  # real rows 1..20: the gathered path
    shifted_coords = torch.cat([coords[:1], coords])
    torch.manual_seed(3)
    source, prefix = branch.run_bag(x, valid=torch.arange(20), coords=coords, prototypes=prototypes)
    torch.manual_seed(3)
    source_g, gathered = branch.run_bag(shifted, valid=torch.arange(1, 21), coords=shifted_coords,
                                         prototypes=prototypes)
    assert torch.equal(source + 1, source_g)
    for field in ("cluster", "weight", "merged", "features", "attention"):
        torch.testing.assert_close(getattr(prefix, field), getattr(gathered, field), rtol=1e-5, atol=1e-6)
