"""The student's map scorers fitted to the teacher's maps (training/map_scorers.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_dismm.errors import DataError
from napari_dismm.model.registry import build_model
from training import map_scorers
from training.map_scorers import MAP_PENALTIES, fit_map_scorers, fit_score, teacher_map_samples
from training.probes import fit_frozen_paths
from training.stages.supervised import model_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def planted_slides(v: torch.Tensor, n_slides: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Slides of standardised patches whose target maps are softmax(z . v), one per column."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_slides):
        z = torch.randn(150, v.shape[0], generator=g)
        target = torch.softmax(z @ v, dim=0)
        out.append((z, torch.stack([target, target.flip(0)], dim=1)))
    return out


def mean_kl(v: torch.Tensor, slides, column: int) -> float:
    return float(map_scorers._mean_kl(v, slides, column))


def test_a_planted_score_direction_is_recovered_and_beats_the_uniform_pooling():
    v_true = torch.tensor([2.0, -1.0, 0.0, 0.0, 0.5, 0.0])
    train, val = planted_slides(v_true, 12, seed=0), planted_slides(v_true, 6, seed=1)
    v, chosen = fit_score(train, val, column=0)
    assert chosen["penalty"] in MAP_PENALTIES
    cosine = float(v @ v_true / (v.norm() * v_true.norm()))
    assert cosine > 0.95
    assert mean_kl(v, val, 0) < 0.2 * mean_kl(torch.zeros(6), val, 0)


def test_targets_without_a_direction_keep_the_scores_near_zero():
    """Maps unrelated to the features (as where no region carries the label): validation picks
    a penalty that leaves the pooling close to the mean."""
    g = torch.Generator().manual_seed(3)
    noise = [(torch.randn(150, 6, generator=g), torch.softmax(torch.randn(150, 2, generator=g), dim=0))
             for _ in range(18)]
    v, chosen = fit_score(noise[:12], noise[12:], column=0)
    assert chosen["penalty"] >= 1.0 and float(v.norm()) < 0.3


def test_the_fitted_scorers_follow_the_teachers_maps_on_its_slides(setup):
    """Fitted to a fold's teacher, the scores' softmax is closer (KL) to the teacher's map on
    the training slides than the mean pooling is; a patch cap bounds what each slide gives."""
    torch.manual_seed(0)
    teacher = build_model(model_config("teacher", setup)).eval()
    with torch.no_grad():  # an untrained teacher's gene gates are closed and its maps uniform: give it some
        for p in teacher.parameters():
            p.add_(0.5 * torch.randn_like(p))
    student = build_model(model_config("student", setup))
    chosen = fit_map_scorers(student, teacher, setup.data.train, setup.data.val, seed=0)
    mags = list(setup.cohort.magnifications)
    samples = teacher_map_samples(teacher, student, setup.data.train, mags, rng=np.random.default_rng(0))
    for i, mag in enumerate(mags):
        sc = student.map_scorers
        z = [((x - sc.mean[i]) / sc.scale[i], t) for x, t in samples[mag]]
        for column, u in enumerate(("tumor", "tme")):
            assert chosen[mag][u]["penalty"] in MAP_PENALTIES
            uniform = mean_kl(torch.zeros_like(sc.weight[i, column]), z, column)
            assert uniform > 1e-3 and mean_kl(sc.weight[i, column], z, column) < 0.97 * uniform


def test_the_patch_cap_and_a_missing_teacher(setup, monkeypatch):
    monkeypatch.setattr(map_scorers, "MAP_FIT_PATCHES", 3)
    teacher = build_model(model_config("teacher", setup)).eval()
    student = build_model(model_config("student", setup))
    samples = teacher_map_samples(teacher, student, setup.data.train, ["10x"], rng=np.random.default_rng(0))
    assert samples["10x"] and all(len(x) == 3 and torch.allclose(t.sum(0), torch.ones(2)) for x, t in samples["10x"])
    with pytest.raises(DataError, match="teacher"):
        fit_frozen_paths(student, setup.data, task=setup.task, n_outputs=setup.n_outputs, select_on="loss", seed=0)
