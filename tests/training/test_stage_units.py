"""Units of the loops: batching across ranks, checkpoint round trip, stage I/II objectives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.config import config_from_dict
from training.dataset import collate_bags
from training.ddp import DistContext, epoch_batches
from training.engine import load_checkpoint, save_checkpoint, seed_for
from training.stages.supervised import SupervisedObjective, model_config
from training.stages.distillation import DistillationObjective, name_subspaces_by_teacher, teacher_prototypes
from napari_dismm.model.registry import build_model
from tests.training.synth_files import write_cohort


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("n, batch", [(10, 4), (11, 4), (8, 2), (7, 6)])
def test_rank_batches_union_is_the_single_process_batch(n, batch):
    single = epoch_batches(n, batch_size=batch, seed=3, epoch=2, ctx=DistContext())
    ranks = [epoch_batches(n, batch_size=batch, seed=3, epoch=2, ctx=DistContext(rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    assert sorted(i for b in single for i in b) == list(range(n))
    if n % 2 == 0:  # no padding: every global step holds the same samples
        for k, step in enumerate(single):
            assert sorted(ranks[0][k] + ranks[1][k]) == sorted(step)
    other_epoch = epoch_batches(n, batch_size=batch, seed=3, epoch=3, ctx=DistContext())
    assert other_epoch != single or n < 3


def test_seed_for_is_stable_and_distinct():
    assert seed_for(0, "teacher", 1, 2) == seed_for(0, "teacher", 1, 2)
    assert seed_for(0, "teacher", 1, 2) != seed_for(0, "teacher", 1, 3)


def test_checkpoint_round_trip_restores_model_optimizer_and_rng(setup, tmp_path):
    torch.manual_seed(0)
    model = build_model(model_config("teacher", setup))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    obj = SupervisedObjective(model, task="classification", class_weights=setup.class_weights, dev_weight=1.0, cgc=True,
                              patch_size_10x_level0=setup.patch_size_10x_level0)
    batch = collate_bags([setup.data.train[i] for i in range(4)])
    loss, parts = obj.train_loss(model, batch)
    loss.backward()
    obj.after_backward()
    opt.step()
    best = {k: v.clone() * 2 for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path, model=model, optimizer=opt, best=best, info={"epoch": 1, "history": [{"epoch": 1}]})
    expected_rng = torch.get_rng_state()
    torch.rand(5)

    model2 = build_model(model_config("teacher", setup))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    best2, info = load_checkpoint(tmp_path, model=model2, optimizer=opt2)
    assert info == {"epoch": 1, "history": [{"epoch": 1}]}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert all(torch.equal(best[k], best2[k]) for k in best)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[p][k], s2[p][k]) for p in s1 for k in s1[p])
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert not list(tmp_path.glob("*.pt")) and (tmp_path / "state.json").exists()


def test_teacher_objective_has_every_term_and_cgc_acts(setup):
    torch.manual_seed(1)
    model = build_model(model_config("teacher", setup))
    obj = SupervisedObjective(model, task="classification", class_weights=setup.class_weights, dev_weight=1.0, cgc=True,
                              patch_size_10x_level0=setup.patch_size_10x_level0)
    batch = collate_bags([setup.data.train[i] for i in range(4)])
    loss, parts = obj.train_loss(model, batch)
    assert set(parts) == {"task", "task_per_mag", "dev"}
    assert float(loss.detach()) == pytest.approx(parts["task"] + parts["task_per_mag"] + parts["dev"], rel=1e-5)
    loss.backward()
    report = obj.after_backward()
    assert 0.0 <= report["cgc_projected"] <= 1.0
    for head in model.fusion_heads.values():  # after CGC the blocks never point against each other
        g = head.linear.weight.grad
        cos = torch.nn.functional.cosine_similarity(g[:, :16].reshape(1, -1), g[:, 16:].reshape(1, -1))
        assert float(cos) > -1e-5
    off = SupervisedObjective(model, task="classification", class_weights=None, dev_weight=0.0, cgc=False)
    _, parts_off = off.train_loss(model, batch)
    assert "dev" not in parts_off and off.after_backward() == {}


def test_dev_enters_after_its_warmup(setup):
    """Epochs before ``dev_warmup`` train on the task alone; from it on, DEV is in the loss."""
    torch.manual_seed(1)
    model = build_model(model_config("teacher", setup))
    obj = SupervisedObjective(model, task="classification", class_weights=setup.class_weights, dev_weight=1.0,
                              patch_size_10x_level0=setup.patch_size_10x_level0, dev_warmup=2)
    batch = collate_bags([setup.data.train[i] for i in range(4)])
    seen = {}
    for epoch in range(4):
        obj.set_epoch(epoch)
        loss, parts = obj.train_loss(model, batch)
        seen[epoch] = "dev" in parts
        if seen[epoch]:
            assert parts["dev"] > 0 and float(loss.detach()) > parts["task"] + parts["task_per_mag"]
    assert seen == {0: False, 1: False, 2: True, 3: True}


def test_student_prototypes_and_distillation_terms(setup):
    torch.manual_seed(2)
    teacher = build_model(model_config("teacher", setup)).eval()
    student = build_model(model_config("student", setup))
    protos = teacher_prototypes(teacher, setup.data.train, batch_size=4)
    assert set(protos) == {"10x", "20x"}
    for mag, per in protos.items():
        student.set_subspace_prototypes(per["tumor"], per["tme"], magnification=mag)
        assert torch.allclose(per["tumor"].mean(), torch.tensor(0.0), atol=1e-5)  # mean of layer-normed vectors
    assert bool(student.prototypes_set.all())
    obj = DistillationObjective(teacher, task="classification", class_weights=setup.class_weights, temperature=2.0,
                                lambda_kd=0.5, lambda_f=0.5, lambda_att=1.0)
    batch = collate_bags([setup.data.train[i] for i in range(4)])
    loss, parts = obj.train_loss(student, batch)
    assert set(parts) == {"task", "task_per_mag", "kd", "feature", "attention"} and np.isfinite(float(loss))
    assert parts["attention"] > 0  # an untrained student's maps are not the teacher's
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is frozen
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_swapping_subspaces_renames_the_maps_and_keeps_every_logit(setup):
    torch.manual_seed(3)
    student = build_model(model_config("student", setup)).eval()
    batch = collate_bags([setup.data.train[i] for i in range(4)])
    with torch.no_grad():
        before = student(batch.bags, coords=batch.coords, masks=batch.masks)
        student.swap_subspaces("10x")
        after = student(batch.bags, coords=batch.coords, masks=batch.masks)
    torch.testing.assert_close(after.logits, before.logits)
    for mag in ("10x", "20x"):
        torch.testing.assert_close(after.per_magnification_logits[mag], before.per_magnification_logits[mag])
    assert torch.equal(after.attention["10x"]["tumor"], before.attention["10x"]["tme"])
    assert torch.equal(after.attention["10x"]["tme"], before.attention["10x"]["tumor"])
    assert torch.equal(after.attention["20x"]["tumor"], before.attention["20x"]["tumor"])


def test_naming_by_teacher_undoes_a_swap_and_leaves_agreeing_names(setup):
    """A model's own maps stand in for the teacher's: as named, they agree perfectly."""
    import copy

    torch.manual_seed(4)
    reference = build_model(model_config("student", setup)).eval()
    student = copy.deepcopy(reference)
    swapped, agreement = name_subspaces_by_teacher(student, reference, setup.data.train, batch_size=4)
    assert swapped == [] and agreement["10x"]["as_named"] == pytest.approx(1.0)
    student.swap_subspaces("20x")
    swapped, agreement = name_subspaces_by_teacher(student, reference, setup.data.train, batch_size=4)
    assert swapped == ["20x"] and agreement["20x"]["swapped"] == pytest.approx(1.0)
    assert agreement["20x"]["as_named"] < agreement["20x"]["swapped"]
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), reference.state_dict().values()))


def test_baselines_combine_by_the_mean_and_dismm_models_by_the_reference_rule(setup):
    """``[baselines] combine`` (mean) reaches ABMIL and late fusion, ``[model] combine`` (max
    confidence) the teacher and the student (issue 13: README, Combining the magnifications)."""
    assert (setup.cfg.model.combine, setup.cfg.baselines.combine) == ("max_confidence", "mean")
    for kind, rule in (("teacher", "max_confidence"), ("student", "max_confidence"), ("abmil", "mean"),
                       ("late_fusion", "mean")):
        config = model_config(kind, setup)
        assert config["combine"] == rule, kind
        assert build_model(config).config.combine == rule


def test_weight_ema_keeps_the_moving_average_of_the_weights(tmp_path):
    """With ``[cv] weight_ema`` the fold keeps (and validation judges) the moving average of
    the weights, not the last step's; the checkpoint carries both so a resume can go on."""
    from safetensors.torch import load_file

    from training.run import run_training

    files = write_cohort(tmp_path / "cohort", n_patients=16, feature_dim=8)
    kept = {}
    for decay in (0.0, 0.9):
        out = tmp_path / f"run_{decay}"
        cfg = config_from_dict({"model": {"d": 16}, "data": {"batch_size": 2}, "cv": {"folds": 2, "weight_ema": decay},
                                "baselines": {"epochs": 1, "patience": 0}})
        run_training(cohort_csv=files.csv, expression=files.expression, gene_sets=files.gmt, task="classification",
                     out=out, config=cfg, models=["abmil"], log=None)
        fold = out / "abmil" / "fold_0"
        best = load_file(str(fold / "best" / "model.safetensors"))
        state = load_file(str(fold / "checkpoint" / "state.safetensors"))
        last = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        average = {k[len("average.module."):]: v for k, v in state.items() if k.startswith("average.module.")}
        assert best.keys() == last.keys()
        if decay:  # one epoch: the selected state is the average after it, which is not the last step's
            assert average.keys() == best.keys()
            assert all(torch.equal(best[k], average[k]) for k in best)
            assert any(not torch.equal(best[k], last[k]) for k in best)
        else:
            assert not average and all(torch.equal(best[k], last[k]) for k in best)
        kept[decay] = best
    assert any(not torch.equal(kept[0.0][k], kept[0.9][k]) for k in kept[0.0])


def test_student_validation_can_judge_the_whole_distillation_objective(setup):
    """``[student] select_by = "objective"``: validation reads the stage-II objective over the
    validation patients (eval mode, batch-size weighted mean of the training loss); "task"
    leaves the engine its task loss (None)."""
    torch.manual_seed(5)
    teacher = build_model(model_config("teacher", setup)).eval()
    student = build_model(model_config("student", setup)).train()
    kw = dict(task="classification", class_weights=setup.class_weights, temperature=2.0, lambda_kd=0.5,
              lambda_f=0.5, lambda_att=1.0)
    val = setup.data.val
    assert DistillationObjective(teacher, **kw).validation_loss(student, val, batch_size=3, device="cpu") is None
    obj = DistillationObjective(teacher, **kw, select_by="objective")
    judged = obj.validation_loss(student, val, batch_size=3, device="cpu")
    assert student.training  # handed back in the mode it came in
    student.eval()
    with torch.no_grad():
        parts = [(obj.train_loss(student, collate_bags([val[i] for i in idx]))[0], len(idx))
                 for idx in (range(k, min(k + 3, len(val))) for k in range(0, len(val), 3))]
    assert judged == pytest.approx(sum(float(loss) * n for loss, n in parts) / len(val), rel=1e-6)
    assert judged > 0


def test_selecting_the_student_on_its_objective_records_and_uses_it(tmp_path):
    """The epoch kept is the one with the lowest validation objective, recorded per epoch."""
    import json

    import pandas as pd

    from training.run import run_training

    files = write_cohort(tmp_path / "cohort", n_patients=16, feature_dim=8)
    cfg = config_from_dict({"model": {"d": 16}, "data": {"batch_size": 4}, "cv": {"folds": 2},
                            "teacher": {"epochs": 2, "patience": 0, "probes": False},
                            "student": {"epochs": 4, "patience": 0, "probes": False, "select_by": "objective"},
                            "baselines": {"run": []}})
    run_training(cohort_csv=files.csv, expression=files.expression, gene_sets=files.gmt, task="classification",
                 out=tmp_path / "run", config=cfg, models=["teacher", "student"], folds=[0], log=None)
    fold = tmp_path / "run" / "student" / "fold_0"
    history = pd.read_csv(fold / "history.csv")
    assert "val_objective" in history and history["val_objective"].notna().all()
    best = json.loads((fold / "metrics.json").read_text())["best_epoch"]
    assert best == int(history.loc[history["val_objective"].idxmin(), "epoch"])
