"""`dismm inspect` on a tiny survival run with a teacher and a student: survival bins are
read from the models, the student's features are compared too (no gene attribution)."""

from __future__ import annotations

import json

import pytest

from training.config import config_from_dict
from training.inspect import inspect_run
from training.run import run_training
from training.synth import planted_cohort_config, write_synthetic_cohort

TINY = {"model": {"d": 16, "dropout": 0.0}, "data": {"batch_size": 4}, "cv": {"folds": 2},
        "teacher": {"epochs": 1}, "student": {"epochs": 1}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_inspect_a_survival_run_with_a_student(tmp_path):
    files = write_synthetic_cohort(tmp_path / "c", config=planted_cohort_config(task="survival", n_patients=16),
                                   n_tumor_genes=4, n_tme_genes=4)
    run_training(cohort_csv=files.csv, expression=files.expression, gene_sets=files.gmt, task="survival",
                 out=tmp_path / "run", config=config_from_dict(TINY), models=["teacher", "student"], folds=[0],
                 log=None)
    summary = inspect_run(tmp_path / "run", cohort_csv=files.csv, expression=files.expression, gene_sets=files.gmt,
                          out=tmp_path / "out", ig_steps=2)
    assert summary["task"] == "survival" and list(summary["models"]) == ["teacher", "student"]
    assert "attribution" in summary["models"]["teacher"] and "attribution" not in summary["models"]["student"]
    for entry in summary["models"].values():
        cka = entry["similarity"]["20x"]["cka"]["mean"]
        assert cka is None or 0.0 <= cka <= 1.0 + 1e-9
    assert (tmp_path / "out" / "projection_student.png").exists()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["models"].keys() == summary["models"].keys()
