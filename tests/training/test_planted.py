"""Acceptance on the planted cohort (held-out folds): the teacher and student reach the
issue's figures, the ablations sit in the same table, attention finds the planted regions."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from napari_dismm.model.checkpoint import load_model
from napari_dismm.omics import ExpressionNormaliser
from training.cohort import load_cohort
from training.config import DEV_WEIGHT_ON, TeacherSettings, config_from_dict
from training.dataset import SlideDataset
from training.engine import predict
from training.run import fold_attention_auroc, format_table, run_training
from training.splits import Split
from training.synth import planted_cohort_config, write_synthetic_cohort

CONFIG = {
    "model": {"d": 64, "dropout": 0.1},
    "data": {"batch_size": 8},
    "teacher": {"epochs": 25, "lr": 2e-3, "patience": 8},
    "student": {"epochs": 60, "lr": 1e-3, "patience": 15},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(root, task, models, ablations=False, seed=0):
    files = write_synthetic_cohort(root / "cohort", config=planted_cohort_config(task=task, n_patients=64, seed=seed),
                                   n_tumor_genes=16, n_tme_genes=16)
    summary = run_training(cohort_csv=files.csv, expression=files.expression, gene_sets=files.gmt, task=task,
                           out=root / "run", config=config_from_dict(CONFIG), models=models, ablations=ablations,
                           log=None)
    return files, root / "run", summary


@pytest.fixture(scope="module")
def classification(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("planted_cls"), "classification", ["teacher", "student"], ablations=True)


@pytest.mark.slow
def test_teacher_and_student_auc_on_held_out_folds(classification):
    _, run, summary = classification
    print("\n" + format_table(run))
    assert summary["teacher"]["auc"]["mean"] >= 0.95
    assert summary["student"]["auc"]["mean"] >= 0.90


@pytest.mark.slow
def test_ablations_in_one_table(classification):
    """Each component switched away from its default: DEV and CGC are off by default (issue
    13), so their rows are the teacher *with* them; spatial context is on, so its row is without."""
    _, run, summary = classification
    rows = {"teacher_cgc": ("cgc", True), "teacher_dev": ("dev_weight", DEV_WEIGHT_ON),
            "teacher_no_context": ("spatial_context", 0.0)}
    assert {"teacher", "student", *rows} <= set(summary)
    table = pd.read_csv(run / "summary.csv")
    auc = table[table.metric == "auc"].set_index("model")["mean"]
    assert {"teacher", *rows} <= set(auc.index)
    teacher = json.loads((run / "teacher" / "fold_0" / "best" / "config.json").read_text())["model"]
    assert (teacher["cgc"], teacher["dev_weight"]) == (TeacherSettings().cgc, TeacherSettings().dev_weight)
    for name, (key, value) in rows.items():
        config = json.loads((run / name / "fold_0" / "best" / "config.json").read_text())["model"]
        assert config[key] == value and all(config[k] == teacher[k] for k in ("cgc", "dev_weight", "spatial_context")
                                            if k != key)


def _attention(files, run, model_name):
    cohort = load_cohort(cohort_csv=files.csv, expression=files.expression, gene_sets=files.gmt, task="classification")
    split = Split.load(run / "split.json")
    regions = pd.read_csv(files.regions)
    maps, truth = [], []
    for k, fold in enumerate(split.folds):
        model, doc = load_model(run / model_name / f"fold_{k}" / "best")
        norm = ExpressionNormaliser.from_dict(doc["normaliser"])
        pred = predict(model, SlideDataset(cohort=cohort, patients=fold.test, normaliser=norm), attention=True)
        maps += pred.attention
        truth += [{m: g["region"].to_numpy() for m, g in regions[regions.slide_id == s].groupby("magnification")}
                  for s in pred.slide_ids]
    return maps, truth


@pytest.fixture(scope="module")
def attention_aurocs(classification):
    """Held-out AUROC of each map on each planted region, mean over slides and magnifications."""
    files, run, _ = classification
    found = {}
    for name in ("teacher", "teacher_dev", "student"):
        maps, truth = _attention(files, run, name)
        found[name] = {(att, region): fold_attention_auroc(maps, truth, attention=att, region=region)
                       for att in ("tumor", "tme") for region in ("tumor", "tme")}
        print(f"\n{name} attention AUROC: " + ", ".join(f"{a} map on {r} patches {v:.3f}"
                                                        for (a, r), v in found[name].items()))
    return found


@pytest.mark.slow
def test_teacher_attention_separates_the_planted_regions(attention_aurocs):
    """Measured with DEV and CGC on (the defaults before issue 13): 0.944 / 0.952 with spatial
    context, 0.897 / 0.907 without; without DEV 0.873 / 0.832. With the issue-13 teacher (genes
    in the prediction, DEV and CGC off by default, chosen on planted regimes where DEV cost the
    maps of slide-only cohorts): 0.884 / 0.903 on this cohort, whose genes carry the state, the
    regime where DEV helps the maps (README, Planted regimes); with the gene gates (model format
    4) 0.918 / 0.900 (with the magnifications' probabilities averaged, not the default, 0.912 / 0.906).
    A detector that knows the planted directions reaches 0.92 per patch from tissue type alone, 0.98 with the state."""
    teacher = attention_aurocs["teacher"]
    assert teacher["tumor", "tumor"] >= 0.85 and teacher["tme", "tme"] >= 0.85


@pytest.mark.slow
def test_student_without_genes_keeps_the_teachers_maps(attention_aurocs):
    """Soft ITA memberships + attention distillation (model/ita.py, model/losses.py); with
    hard merging and no attention term the student's maps were 0.54 / 0.55 here. Measured:
    0.849 / 0.896 from the teacher with spatial context (0.882 / 0.870 from the teacher
    without it, 0.897 / 0.907); on cohort seed 2, not used for any choice, 0.846 / 0.870
    (teacher without context 0.841 / 0.838). With the issue-13 teacher and defaults (DEV and
    CGC off; its own maps 0.884 / 0.903 here): 0.798 / 0.826, and each map on the other's
    region 0.681 / 0.613 (teacher 0.426 / 0.385): the student's maps separate less than before.
    From the gated teacher (format 4, 0.918 / 0.900): 0.787 / 0.785, on the other's region 0.655 /
    0.646 — close to the 0.78 floor (a student that draws its dropout masks in another order
    measured 0.777: the floor is within seed noise of what this cohort gives). Teacher and
    student combining their magnifications by the mean of the probabilities instead (issue 13,
    not the default): teacher 0.912 / 0.906, student 0.761 / 0.765."""
    student, teacher = attention_aurocs["student"], attention_aurocs["teacher"]
    for u, other in (("tumor", "tme"), ("tme", "tumor")):
        # "most of it": at least 0.78, and more than half of the teacher's margin over chance
        assert student[u, u] >= 0.78 and student[u, u] - 0.5 > 0.5 * (teacher[u, u] - 0.5)
        # the two maps separate: each ranks its own region well above the other's
        assert student[u, other] <= student[u, u] - 0.1


def _oracle_c_index(files) -> float:
    """C-index of the true planted log-hazard: the ceiling any model can reach on this cohort."""
    from lifelines.utils import concordance_index

    frame = pd.read_csv(files.csv).merge(pd.read_csv(files.truth))
    from training.synth.layout import SURVIVAL_TME_LOG_HR, SURVIVAL_TUMOR_LOG_HR

    log_hazard = SURVIVAL_TUMOR_LOG_HR * frame.tumor_state + SURVIVAL_TME_LOG_HR * frame.tme_state
    return float(concordance_index(frame.time, -log_hazard, frame.event))


@pytest.mark.slow
def test_survival_teacher_c_index(tmp_path_factory):
    """Held-out C-index, mean over three planted cohorts (seeds 0-2). One cohort of 64
    patients in three folds is too few to read to 0.05: its folds spread with sd ~0.1, and
    the cohort means moved by up to 0.05 between two teachers whose mean over the seeds
    agreed (spatial context on: 0.742 / 0.816 / 0.771; off: 0.793 / 0.789 / 0.758). With the
    issue-13 defaults (genes in the prediction, DEV and CGC off): 0.768 / 0.747 / 0.725, mean
    0.747 (oracle 0.81-0.85) against 0.776 before: lower, within the spread named above. With
    the gene gates (format 4): 0.795 / 0.703 / 0.783, mean 0.760; with the magnifications'
    hazards averaged (not the default): 0.773 / 0.738 / 0.788, mean 0.766."""
    means = []
    for seed in (0, 1, 2):
        files, run, summary = _train(tmp_path_factory.mktemp(f"planted_surv{seed}"), "survival", ["teacher"], seed=seed)
        print(f"\ncohort seed {seed}\n" + format_table(run)
              + f"\noracle C-index (true hazard): {_oracle_c_index(files):.3f}")
        means.append(summary["teacher"]["c_index"]["mean"])
    print(f"mean over the cohorts: {sum(means) / len(means):.3f}")
    assert sum(means) / len(means) >= 0.72
