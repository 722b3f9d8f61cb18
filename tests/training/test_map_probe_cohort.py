"""The student's map-pooled probe on a planted cohort whose label lives in a few patches.

On `small_region` (a tumor region of ~4 % of the patches in class-1 slides) the mean of all
patches dilutes the signal; scores fitted to the teacher's maps pool the region's features.
The test trains the teacher once (3 folds, shortened) and fits the student's probe both ways
on each fold against the same teacher, comparing the probes alone on the held-out patients:
it fails if the fit to the teacher's maps (training/map_scorers.py) or the pooling
(model/probes.py) stops finding the region. The full comparison, student trained, is in
docs/regimes.md (choice seeds 1-2: `small_region` 0.837 / 0.858 -> 0.979 / 0.934). Here, cohort
seed 5, the probes alone, mean over folds: mean 0.859, map-pooled 0.925 (seeds 6 / 7, run once
to check the margin: 0.873 -> 0.955, 0.906 -> 0.970). ~30 s on one core."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from napari_dismm.model.checkpoint import load_model
from napari_dismm.model.registry import build_model
from training.cohort import load_cohort
from training.config import config_from_dict
from training.probes import fit_frozen_paths, mean_pooled, probe_inputs
from training.recipes.regimes import run_regime
from training.splits import Split
from training.stages.supervised import model_config, prepare_fold

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = {"model": {"d": 64}, "teacher": {"epochs": 20}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("map_probe")
    run_regime(out, regime="small_region", seed=5, n_patients=64, models=["teacher"], config=CONFIG, maps=False)
    return out


def held_out_auc(student, setup, pooling: str) -> float:
    """AUC of the student's fitted slide probe alone on the fold's test patients."""
    data = setup.data.test
    x = probe_inputs(student, data).x if pooling == "teacher_maps" else mean_pooled(
        data, mags=list(setup.cohort.magnifications)).x
    with torch.no_grad():
        logits = student.slide_probe(torch.from_numpy(x).float())
    p = torch.softmax(logits, dim=-1).numpy()
    y = data_targets(data)
    if p.shape[1] == 2:
        return float(roc_auc_score(y, p[:, 1]))
    return float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(p.shape[1]))))


def data_targets(dataset) -> np.ndarray:
    return np.array([int(s.class_index) for s in dataset.slides])


@pytest.mark.slow
def test_the_map_pooled_probe_reads_a_small_region_the_mean_misses(trained):
    c = trained / "cohort"
    cohort = load_cohort(cohort_csv=c / "cohort.csv", expression=c / "expression.tsv", gene_sets=c / "sets.gmt",
                         task="classification")
    cfg = config_from_dict(CONFIG)
    split = Split.load(trained / "run" / "split.json")
    aucs = {"mean": [], "teacher_maps": []}
    for k, fold in enumerate(split.folds):
        setup = prepare_fold(cohort, fold, k, cfg, use_genes=True)
        teacher, _ = load_model(trained / "run" / "teacher" / f"fold_{k}" / "best")
        for pooling in aucs:
            student = build_model({**model_config("student", setup), "probe_pooling": pooling})
            fit_frozen_paths(student, setup.data, task=setup.task, n_outputs=setup.n_outputs, select_on="loss",
                             seed=k, teacher=teacher)
            aucs[pooling].append(held_out_auc(student, setup, pooling))
    print({k: [round(v, 3) for v in vs] for k, vs in aucs.items()})
    mean_auc, map_auc = np.mean(aucs["mean"]), np.mean(aucs["teacher_maps"])
    assert map_auc >= mean_auc + 0.03 and map_auc >= 0.88, aucs  # seeds 5 / 6 / 7: +0.066 / +0.082 / +0.064
