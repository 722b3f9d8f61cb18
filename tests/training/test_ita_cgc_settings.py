"""The issue-14 settings reach the models: ``[model] ita_*`` the student's ITA and
``[teacher] cgc_granularity`` the teacher's CGC step, with bad values refused."""

from __future__ import annotations

import pytest

from napari_dismm.errors import ModelConfigError
from napari_dismm.model.registry import build_model
from napari_dismm.model.teacher import TeacherConfig
from tests.training.synth_files import write_cohort
from training.cohort import load_cohort
from training.config import config_from_dict
from training.splits import split_cohort
from training.stages.supervised import SupervisedObjective, model_config, prepare_fold

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    files = write_cohort(tmp_path_factory.mktemp("ita_cgc"), n_patients=8, feature_dim=8)
    loaded = load_cohort(cohort_csv=files.csv, expression=files.expression, gene_sets=files.gmt, task="classification")
    return loaded, split_cohort(loaded, n_folds=2, val_fraction=0.25, seed=0)


def _setup(cohort, sections):
    loaded, split = cohort
    cfg = config_from_dict({"model": {"d": 16, "dropout": 0.0}, **sections})
    return prepare_fold(loaded, split.folds[0], 0, cfg, use_genes=True)


def test_defaults_and_choices(cohort):
    setup = _setup(cohort, {})
    student = build_model(model_config("student", setup))
    ita = student.branches["10x"].ita
    assert (ita.candidates, ita.membership_scale, ita.n_anchors, ita.temperature) == ("anchors", "spread", 2048, 2.0)
    teacher = build_model(model_config("teacher", setup))
    assert teacher.config.cgc_granularity == "block"
    for section, key, bad in (("model", "ita_candidates", "all"), ("model", "ita_membership_scale", "gap"),
                              ("model", "ita_anchors", 1), ("teacher", "cgc_granularity", "class")):
        with pytest.raises(ModelConfigError, match=key):
            config_from_dict({section: {key: bad}})
    with pytest.raises(ModelConfigError, match="cgc_granularity"):
        TeacherConfig(cgc_granularity="class")


def test_settings_reach_the_models(cohort):
    setup = _setup(cohort, {"model": {"d": 16, "dropout": 0.0, "ita_candidates": "densest", "ita_anchors": 512,
                                      "ita_membership_scale": "width", "ita_temperature": 1.5},
                            "teacher": {"cgc_granularity": "row", "cgc": True}})
    student = build_model(model_config("student", setup))
    ita = student.branches["20x"].ita
    assert (ita.candidates, ita.membership_scale, ita.n_anchors, ita.temperature) == ("densest", "width", 512, 1.5)
    teacher = build_model(model_config("teacher", setup))
    assert teacher.config.cgc_granularity == "row"
    objective = SupervisedObjective(teacher, task="classification", class_weights=setup.class_weights, cgc=True,
                                    cgc_granularity=teacher.config.cgc_granularity)
    assert objective.cgc.granularity == "row"
