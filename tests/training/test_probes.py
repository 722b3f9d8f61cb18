"""Fitting the frozen linear paths (training/probes.py) and training beside them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_dismm.model.probes import own_outputs
from napari_dismm.model.registry import build_model
from training.dataset import collate_bags
from training.map_scorers import MAP_PENALTIES
from training.probes import fit_frozen_paths, gene_vectors, mean_pooled
from training.stages.distillation import DistillationObjective
from training.stages.supervised import SupervisedObjective, model_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fitted(kind, setup, teacher=None, **changes):
    torch.manual_seed(0)
    model = build_model({**model_config(kind, setup), **changes})
    chosen = fit_frozen_paths(model, setup.data, task=setup.task, n_outputs=setup.n_outputs, select_on="loss", seed=0,
                              teacher=teacher)
    return model, chosen


def test_the_defaults_fit_the_teachers_two_probes_on_the_training_part(setup):
    """The slide probe reads the mean patch features of every magnification, standardised
    with the training part's statistics (what validation chose is recorded); the gene probe
    reads the gene vectors in the teacher's order."""
    assert setup.cfg.teacher.probes and setup.cfg.student.probes
    model, chosen = fitted("teacher", setup)
    assert set(chosen) == {"slide", "genes"} and all("C" in c for c in chosen.values())
    mags = list(setup.cohort.magnifications)
    x = mean_pooled(setup.data.train, mags=mags).x
    np.testing.assert_allclose(model.slide_probe.mean.numpy(), x.mean(0), rtol=1e-4, atol=1e-5)
    g = gene_vectors(setup.data.train).x
    np.testing.assert_allclose(model.gene_probe.mean.numpy(), g.mean(0), rtol=1e-4, atol=1e-5)
    assert float(model.slide_probe.weight.abs().sum()) > 0 and float(model.gene_probe.weight.abs().sum()) > 0
    student, chosen = fitted("student", setup, teacher=model)
    assert set(chosen) == {"map_scorers", "slide"} and not hasattr(student, "gene_probe")
    assert setup.cfg.student.probe_pooling == "teacher_maps"
    assert student.slide_probe.mean.shape == (3 * len(mags) * setup.d_in,)  # mean, then tumor- and TME-pooled
    np.testing.assert_allclose(student.slide_probe.mean.numpy()[:len(mags) * setup.d_in], x.mean(0), rtol=1e-4,
                               atol=1e-5)
    assert set(chosen["map_scorers"]) == set(mags) and all(
        c["penalty"] in MAP_PENALTIES for per in chosen["map_scorers"].values() for c in per.values())
    abmil = build_model(model_config("abmil", setup))
    assert fit_frozen_paths(abmil, setup.data, task=setup.task, n_outputs=setup.n_outputs, select_on="loss",
                            seed=0) is None and own_outputs(abmil) == {}


def test_training_losses_read_the_models_own_logits(setup):
    """Probes change what a model predicts, not how its own part is trained: the stage I and
    stage II losses are the same with fitted probes as with none (the attention keeps its
    training signal, README)."""
    batch = collate_bags([setup.data.train[i] for i in range(4)])
    teacher, _ = fitted("teacher", setup)
    student, _ = fitted("student", setup, teacher=teacher)
    teacher.eval(), student.eval()  # no dropout: two passes must agree
    losses = []
    for fitted_probes in (True, False):
        if not fitted_probes:
            for probe in (teacher.slide_probe, teacher.gene_probe, student.slide_probe):
                probe.weight.zero_(), probe.bias.zero_()
        stage1 = SupervisedObjective(teacher, task=setup.task, class_weights=setup.class_weights,
                                     slide_aux_weight=1.0)
        stage2 = DistillationObjective(teacher, task=setup.task, class_weights=setup.class_weights, temperature=2.0,
                                       lambda_kd=0.1, lambda_f=0.1, lambda_att=1.0, own=own_outputs(student))
        with torch.no_grad():
            losses.append((float(stage1.train_loss(teacher, batch)[0]), float(stage2.train_loss(student, batch)[0]),
                           teacher(batch.bags, **batch.model_kwargs()).logits.clone()))
    assert losses[0][:2] == pytest.approx(losses[1][:2], rel=1e-5)
    assert not torch.allclose(losses[0][2], losses[1][2])  # the prediction does read them


def test_a_training_part_of_one_class_leaves_the_probes_empty(setup):
    """Logistic regression needs two classes: with one, the probes add nothing (and say why)
    instead of stopping the run."""
    import dataclasses

    from training.dataset import SlideDataset

    train = setup.data.train
    first = min(int(s.class_index) for s in train.slides)
    patients = sorted({s.patient_id for s in train.slides if int(s.class_index) == first})
    one = dataclasses.replace(setup.data, train=SlideDataset(cohort=setup.cohort, patients=patients,
                                                             normaliser=setup.data.normaliser))
    model = build_model(model_config("teacher", setup))
    chosen = fit_frozen_paths(model, one, task=setup.task, n_outputs=setup.n_outputs, select_on="loss", seed=0)
    assert all("skipped" in c for c in chosen.values())
    assert float(model.slide_probe.weight.abs().sum()) == 0 and float(model.gene_probe.weight.abs().sum()) == 0


def test_the_slide_probe_reads_whole_slides_when_training_caps_the_bags(setup):
    """Training trains on spatial blocks of a slide larger than ``max_patches``; the probe is
    fitted on the whole slide's mean, which is what it reads at inference."""
    import dataclasses

    from training.dataset import SlideDataset

    patients = list(dict.fromkeys(s.patient_id for s in setup.data.train.slides))
    capped = SlideDataset(cohort=setup.cohort, patients=patients, normaliser=setup.data.normaliser, max_patches=3)
    data = dataclasses.replace(setup.data, train=capped)
    model = build_model(model_config("teacher", setup))
    fit_frozen_paths(model, data, task=setup.task, n_outputs=setup.n_outputs, select_on="loss", seed=0)
    mags = list(setup.cohort.magnifications)
    whole = mean_pooled(setup.data.train, mags=mags).x.mean(0)
    np.testing.assert_allclose(model.slide_probe.mean.numpy(), whole, rtol=1e-4, atol=1e-5)
    assert not np.allclose(mean_pooled(capped, mags=mags).x.mean(0), whole, atol=1e-3)


def test_the_student_takes_the_teachers_slide_probe_which_a_refit_would_repeat(setup):
    """Stage II copies the fold teacher's slide probe instead of reading every training slide
    again: the copy equals the student's own fit on the same fold."""
    from training.probes import reuse_slide_probe

    teacher, chosen = fitted("teacher", setup)
    refit, _ = fitted("student", setup, probe_pooling="mean")
    student = build_model({**model_config("student", setup), "probe_pooling": "mean"})
    assert reuse_slide_probe(student, teacher, None) is None
    by_maps = build_model(model_config("student", setup))  # its probe reads more than the teacher's: a refit
    assert reuse_slide_probe(by_maps, teacher, chosen) is None
    got = reuse_slide_probe(student, teacher, chosen)
    assert got["slide"]["C"] == chosen["slide"]["C"]
    for name, buffer in student.slide_probe.named_buffers():
        torch.testing.assert_close(buffer, dict(refit.slide_probe.named_buffers())[name])
