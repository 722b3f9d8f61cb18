"""Headless pieces behind the inspect widget: pyramid level choice and lazy patch reads,
gallery picks, cohort context from a run directory, the teacher's gene vectors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from napari_dismm.errors import DataError, ModelConfigError
from napari_dismm.inspect.context import cohort_context, percentile_of
from napari_dismm.inspect.teacher import teacher_genes
from napari_dismm.model.checkpoint import save_model
from napari_dismm.model.registry import build_model
from napari_dismm.omics import ExpressionNormaliser, read_expression
from napari_dismm.viewer.inspect.layers import gallery_indices, patch_rows, pick_level, read_patch


def test_pick_level_never_coarser_than_the_model_magnification():
    shapes = [(4000, 4000, 3), (2000, 2000, 3), (1000, 1000, 3)]
    assert pick_level(shapes, 1.0) == (0, 1.0)
    assert pick_level(shapes, 2.0) == (1, 2.0)
    assert pick_level(shapes, 3.0) == (1, 2.0)
    assert pick_level(shapes, 8.0) == (2, 4.0)


class CountingArray:
    """A pyramid level that records which regions were read (to prove reads are lazy)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.reads = array, []

    @property
    def shape(self):
        return self.array.shape

    def __getitem__(self, key):
        self.reads.append(key)
        return self.array[key]


def test_read_patch_reads_only_the_patch_from_the_right_level():
    rng = np.random.default_rng(0)
    level0 = rng.integers(0, 255, (800, 800, 3), dtype=np.uint8)
    level1 = level0[::2, ::2].copy()
    levels = [CountingArray(level0), CountingArray(level1)]
    row = pd.Series({"x": 200, "y": 100, "width": 400, "height": 400})
    # slide 0.25 µm/px, 10x = 1 µm/px: downsample 4 wanted, level 1 (2) is the best not coarser
    thumb = read_patch(levels, row, slide_mpp=0.25, mag="10x", size=200)
    assert levels[0].reads == [] and len(levels[1].reads) == 1
    assert np.array_equal(thumb, level1[50:250, 100:300])  # 200 px region, no resampling needed
    assert read_patch(levels, pd.Series({"x": 5000, "y": 0, "width": 10, "height": 10}), slide_mpp=0.25,
                      mag="10x", size=8).sum() == 0  # outside the slide: blank


def test_gallery_indices_and_patch_rows():
    values = np.array([0.1, 0.5, 0.3, 0.9, 0.0])
    picks = gallery_indices(values, k=2)
    assert picks["top"].tolist() == [3, 1] and picks["bottom"].tolist() == [4, 0]
    assert len(set(picks["random"].tolist())) == 2
    frame = pd.DataFrame({"x": [0, 0], "y": [0, 0], "width": 1, "height": 1, "magnification": ["10x", "20x"],
                          "tumor_attention": 1.0, "tme_attention": 1.0, "ita_cluster": -1, "ita_centre": False})
    assert patch_rows(frame)[1] == "20x"
    with pytest.raises(Exception, match="no 40x"):
        patch_rows(frame, "40x")


class FakePrediction:
    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


def _run(tmp_path, task: str) -> tuple:
    """A run directory with two folds' held-out predictions of a 'student' and fold 1's model."""
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    for fold, scale in ((0, 1.0), (1, 100.0)):
        d = run / "student" / f"fold_{fold}"
        d.mkdir(parents=True)
        frame = pd.DataFrame({"slide_id": [f"s{fold}{i}" for i in range(10)],
                              "patient_id": [f"p{fold}{i}" for i in range(10)]})
        if task == "survival":
            frame = frame.assign(time=rng.uniform(1, 30, 10), event=rng.integers(0, 2, 10),
                                 risk=scale * np.arange(10))
        else:
            frame = frame.assign(label="a", prob_a=np.linspace(0, 1, 10), prob_b=1 - np.linspace(0, 1, 10))
        frame.to_csv(d / "test_predictions.csv", index=False)
    model_id = save_model(build_model({"kind": "abmil", "task": "classification", "n_outputs": 2, "d_in": 4,
                                       "d": 4}), run / "student" / "fold_1" / "best")
    return run, model_id


def test_cohort_context_uses_the_fold_of_the_model_that_predicted(tmp_path):
    run, model_id = _run(tmp_path, "survival")
    # risk 450 is the 45th percentile of fold 1 (0..900) but above every fold-0 risk (0..9)
    mine = cohort_context(run, FakePrediction(task="survival", risk=450.0, model_id=model_id, model_kind="student"))
    assert mine.fold == 1 and mine.percentile == pytest.approx(50.0) and mine.model == "student"
    assert set(mine.km) == {"low risk", "high risk"} and 0 <= mine.logrank_p <= 1
    other = cohort_context(run, FakePrediction(task="survival", risk=450.0, model_id="zzz", model_kind="student"))
    assert other.fold is None and other.percentile == pytest.approx((100.0 + 50.0) / 2)
    assert percentile_of(2.0, np.array([1.0, 2.0, 3.0])) == pytest.approx(50.0)


def test_cohort_context_for_classification_and_bad_runs(tmp_path):
    run, model_id = _run(tmp_path, "classification")
    pred = FakePrediction(task="classification", predicted_class="a", class_names=["a", "b"],
                          probabilities=[0.5, 0.5], model_id=model_id, model_kind="student")
    context = cohort_context(run, pred)
    assert context.value_name == "probability of a" and context.percentile == pytest.approx(50.0)
    with pytest.raises(DataError, match="not found"):
        cohort_context(tmp_path / "nothing", pred)
    with pytest.raises(DataError, match="no held-out"):
        cohort_context(tmp_path, pred)


def test_teacher_genes_normalised_with_the_teachers_statistics(tmp_path):
    genes_t, genes_e = ["TP53", "MYC"], ["CD3E", "CD8A", "PTPRC"]
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.uniform(0, 50, (6, 5)), columns=genes_t + genes_e,
                         index=[f"TCGA-AA-000{i}" for i in range(6)])
    path = tmp_path / "expr.tsv"
    table.rename_axis("patient").to_csv(path, sep="\t")
    normaliser = ExpressionNormaliser(log1p=True).fit(read_expression(path), {"tumor": genes_t, "tme": genes_e})
    torch.manual_seed(0)
    teacher = build_model({"kind": "teacher", "task": "classification", "n_outputs": 2, "d_in": 4, "d": 8,
                           "n_tumor_genes": 2, "n_tme_genes": 3, "n_heads": 2})
    save_model(teacher, tmp_path / "teacher", extra={"normaliser": normaliser.to_dict()})
    vectors = teacher_genes(tmp_path / "teacher", path, "TCGA-AA-0003-01A")  # a sample barcode
    expected = (np.log1p(table.loc["TCGA-AA-0003", genes_t].to_numpy(float)) - np.log1p(table[genes_t]).mean().to_numpy())
    sd = np.log1p(table[genes_t]).std(ddof=0).to_numpy()
    assert vectors["tumor"].shape == (2,) and vectors["tme"].shape == (3,)
    assert np.allclose(vectors["tumor"], expected / sd, atol=1e-3) or np.allclose(
        vectors["tumor"], expected / np.log1p(table[genes_t]).std(ddof=1).to_numpy(), atol=1e-3)
    with pytest.raises(DataError, match="not in the expression"):
        teacher_genes(tmp_path / "teacher", path, "TCGA-ZZ-9999")
    save_model(build_model({"kind": "abmil", "task": "classification", "n_outputs": 2, "d_in": 4, "d": 4}),
               tmp_path / "abmil")
    with pytest.raises(ModelConfigError, match="not a teacher"):
        teacher_genes(tmp_path / "abmil", path, "TCGA-AA-0003")
