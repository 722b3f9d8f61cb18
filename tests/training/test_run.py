"""The protocol end to end on a tiny cohort: every model, the run directory, resume-skip."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from napari_dismm.errors import DataError
from napari_dismm.model.checkpoint import load_model
from training.config import config_from_dict
from training.run import collect_summary, format_table, plan_models, run_training
from tests.training.synth_files import write_cohort

TINY = {"model": {"d": 16, "dropout": 0.0}, "data": {"batch_size": 4}, "teacher": {"epochs": 2},
        "student": {"epochs": 2}, "baselines": {"epochs": 2}}
MODELS = ("teacher", "student", "abmil", "late_fusion", "genes_only")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["classification", "survival"])
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"run_{request.param}")
    files = write_cohort(root / "cohort", task=request.param, n_patients=12, feature_dim=8)
    out = root / "out"
    summary = run_training(cohort_csv=files.csv, expression=files.expression, gene_sets=files.gmt,
                           task=request.param, out=out, config=config_from_dict(TINY), log=None)
    return request.param, files, out, summary


def test_run_directory_layout(run):
    task, _, out, _ = run
    assert (out / "config.resolved.toml").exists() and (out / "split.json").exists()
    for model in MODELS:
        for k in range(3):
            fold = out / model / f"fold_{k}"
            for name in ("history.csv", "history.json", "test_predictions.csv", "metrics.json",
                         "checkpoint/state.safetensors", "best/model.safetensors", "best/config.json"):
                assert (fold / name).exists(), fold / name
            history = json.loads((fold / "history.json").read_text())
            assert [r["epoch"] for r in history] == [1, 2]
    figures = {p.name for p in (out / "figures").glob("*.png")}
    kind = "roc" if task == "classification" else "km"
    assert {f"{kind}_{m}.png" for m in MODELS} | {f"training_{m}.png" for m in MODELS} <= figures
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl"))


def test_summary_is_per_model_per_metric_mean_and_sd(run):
    task, _, out, summary = run
    metric = "auc" if task == "classification" else "c_index"
    assert list(summary) == list(MODELS)
    for model in MODELS:
        entry = summary[model][metric]
        assert set(entry) == {"mean", "sd", "folds"} and len(entry["folds"]) == 3
    assert json.loads((out / "summary.json").read_text()) == summary
    table = pd.read_csv(out / "summary.csv")
    assert set(table["model"]) == set(MODELS)
    assert "±" in format_table(out)


def test_best_model_carries_what_prediction_needs(run):
    task, files, out, _ = run
    model, doc = load_model(out / "teacher" / "fold_1" / "best")
    for key in ("encoder", "magnifications", "patch_size", "trained_for", "normaliser", "tumor_genes", "tme_genes", "fold"):
        assert key in doc, key
    assert doc["fold"] == 1 and doc["trained_for"] == task and doc["encoder"] == "synthetic"
    assert doc["tumor_genes"] == list(files.synth.tumor_genes)
    assert ("class_names" in doc) == (task == "classification") and ("bin_edges" in doc) == (task == "survival")
    _, student_doc = load_model(out / "student" / "fold_1" / "best")
    assert student_doc["model"]["kind"] == "student"


def test_test_predictions_cover_each_test_patient_once(run):
    _, _, out, _ = run
    split = json.loads((out / "split.json").read_text())
    for k, fold in enumerate(split["folds"]):
        frame = pd.read_csv(out / "abmil" / f"fold_{k}" / "test_predictions.csv")
        assert sorted(frame["patient_id"]) == sorted(fold["test"])


def test_second_call_resumes_without_retraining(run):
    task, files, out, summary = run
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("*/fold_*/metrics.json")}
    again = run_training(cohort_csv=files.csv, expression=files.expression, gene_sets=files.gmt, task=task, out=out,
                         config=config_from_dict(TINY), log=None)
    assert again == summary
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/fold_*/metrics.json")} == stamp
    assert collect_summary(out) == summary


def test_other_config_in_same_directory_is_refused(run):
    task, files, out, _ = run
    other = config_from_dict({**TINY, "teacher": {"epochs": 3}})
    with pytest.raises(DataError, match="another configuration"):
        run_training(cohort_csv=files.csv, expression=files.expression, gene_sets=files.gmt, task=task, out=out,
                     config=other, log=None)


def test_plan_models_orders_and_checks_names():
    cfg = config_from_dict({})
    assert [m.name for m in plan_models(cfg, models=["student"])] == ["teacher", "student"]
    assert [m.name for m in plan_models(cfg, models=["teacher"], ablations=True)] == [
        "teacher", "teacher_no_context", "teacher_cgc", "teacher_dev"]  # each component switched from its default
    on = config_from_dict({"teacher": {"cgc": True, "dev_weight": 1e-3, "spatial_context": 0.0}})
    assert [m.name for m in plan_models(on, models=["teacher"], ablations=True)] == [
        "teacher", "teacher_no_cgc", "teacher_no_dev"]
    with pytest.raises(DataError, match="unknown model"):
        plan_models(cfg, models=["resnet"])
