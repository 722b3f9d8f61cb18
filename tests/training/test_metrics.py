"""Metrics against direct computations: pair counts for AUC and the C-index, hand-made
cases, a Kaplan-Meier estimate by hand, and the fold summary forms."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from lifelines.statistics import logrank_test

from napari_dismm.errors import DismmWarning
from training.metrics import (
    by_patient,
    c_index,
    classification_metrics,
    macro_auc,
    risk_groups,
    summarise,
    summary_json,
    summary_table,
    survival_metrics,
    write_history,
)


def _auc_by_pairs(positive: np.ndarray, score: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties count 1/2."""
    pos, neg = score[positive], score[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def _harrell_by_pairs(t: np.ndarray, e: np.ndarray, risk: np.ndarray) -> float:
    """Comparable pairs: the earlier time is an event (or the same time as a censoring,
    which counts as surviving longer). Concordant when the earlier one's risk is higher."""
    num = den = 0.0
    for i in range(len(t)):
        for j in range(len(t)):
            if e[i] and (t[i] < t[j] or (t[i] == t[j] and not e[j])):
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


# -- classification ----------------------------------------------------------------------------


def test_binary_hand_made_case():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])  # the textbook example: AUC 0.75
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(y_true=y, probs=probs)
    assert m["auc"] == pytest.approx(0.75)
    # argmax predictions: 0, 0, 0, 1 -> accuracy 3/4, recalls 1 and 1/2
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    # F1 class 0: p = 2/3, r = 1 -> 0.8; class 1: p = 1, r = 1/2 -> 2/3
    assert m["f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_multiclass_auc_is_the_mean_of_one_vs_rest_pair_counts():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    logits = rng.standard_normal((60, 4)) + 1.5 * np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = np.mean([_auc_by_pairs(y == c, probs[:, c]) for c in range(4)])
    assert macro_auc(y, probs) == pytest.approx(expected)
    m = classification_metrics(y_true=y, probs=probs)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert m["balanced_accuracy"] == pytest.approx(np.mean([(pred[y == c] == c).mean() for c in range(4)]))


def test_auc_skips_a_class_absent_from_the_fold():
    y = np.array([0, 0, 1, 1, 1])
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.4, 0.5, 0.1], [0.1, 0.1, 0.8]])
    with pytest.warns(DismmWarning, match=r"class\(es\) \[2\] undefined"):
        auc = macro_auc(y, probs)
    assert auc == pytest.approx(np.mean([_auc_by_pairs(y == c, probs[:, c]) for c in (0, 1)]))
    with pytest.warns(DismmWarning, match="only one class"):
        assert math.isnan(macro_auc(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]])))


def test_by_patient_averages_slides():
    ids, mean = by_patient(["b", "a", "b"], np.array([[0.2, 0.8], [0.9, 0.1], [0.6, 0.4]]))
    assert ids == ["b", "a"]
    np.testing.assert_allclose(mean, [[0.4, 0.6], [0.9, 0.1]])
    ids, mean = by_patient(["x", "x"], np.array([1.0, 3.0]))
    assert ids == ["x"] and mean.tolist() == [2.0]


# -- survival -------------------------------------------------------------------------------------


def test_c_index_matches_the_pair_count_and_the_risk_sign():
    rng = np.random.default_rng(1)
    t = rng.exponential(10, 40).round(1)  # rounding makes tied times
    e = (rng.random(40) < 0.7).astype(int)
    risk = -t + rng.normal(0, 4, 40)
    risk[:5] = risk[5]  # tied risks
    expected = _harrell_by_pairs(t, e, risk)
    assert c_index(times=t, events=e, risks=risk) == pytest.approx(expected)
    assert c_index(times=t, events=e, risks=-risk) == pytest.approx(1 - expected, abs=0.02)
    assert expected > 0.7  # risk tracks early death: a sign error would give < 0.3


def test_risk_groups_kaplan_meier_by_hand():
    t = np.array([2.0, 4.0, 4.0, 6.0, 1.0, 3.0, 5.0, 8.0])
    e = np.array([1, 1, 0, 1, 1, 0, 1, 1])
    risk = np.array([5.0, 6.0, 7.0, 8.0, 1.0, 2.0, 3.0, 4.0])
    groups = risk_groups(times=t, events=e, risks=risk)
    assert groups.threshold == pytest.approx(4.5)
    np.testing.assert_array_equal(groups.high, [True] * 4 + [False] * 4)
    timeline, surv = groups.curves["high risk"]
    # high risk: deaths at 2 (4 at risk), at 4 (3 at risk, one also censored at 4), at 6 (1 at risk)
    km = dict(zip(timeline, surv))
    assert km[2.0] == pytest.approx(3 / 4)
    assert km[4.0] == pytest.approx(3 / 4 * 2 / 3)
    assert km[6.0] == pytest.approx(0.0)
    expected_p = logrank_test(t[:4], t[4:], e[:4], e[4:]).p_value
    assert groups.logrank_p == pytest.approx(expected_p)
    assert survival_metrics(times=t, events=e, risks=risk)["logrank_p"] == pytest.approx(expected_p)


def test_risk_groups_with_one_group_have_no_p():
    groups = risk_groups(times=[1.0, 2.0, 3.0], events=[1, 1, 0], risks=[0.5, 0.5, 0.5])
    assert math.isnan(groups.logrank_p) and list(groups.curves) == ["low risk"]


# -- summaries ------------------------------------------------------------------------------------


RESULTS = {
    "teacher": [{"auc": 0.8, "accuracy": 0.7, "note": "x"}, {"auc": 0.9, "accuracy": 0.6}, {"auc": 0.7, "accuracy": 0.8}],
    "abmil": [{"auc": 0.6, "accuracy": 0.5}, {"auc": float("nan"), "accuracy": 0.5}],
}


def test_summarise_mean_and_sample_sd():
    s = summarise(RESULTS["teacher"])
    assert set(s) == {"auc", "accuracy"}
    assert s["auc"][0] == pytest.approx(0.8) and s["auc"][1] == pytest.approx(np.std([0.8, 0.9, 0.7], ddof=1))
    # an undefined fold is skipped; one value left has no sd
    mean, sd = summarise(RESULTS["abmil"])["auc"]
    assert mean == pytest.approx(0.6) and math.isnan(sd)


def test_summary_table_and_json():
    table = summary_table(RESULTS)
    assert isinstance(table, pd.DataFrame) and list(table.index) == ["teacher", "abmil"]
    assert table.loc["teacher", "auc"] == "0.800 ± 0.100"
    assert table.loc["abmil", "accuracy"] == "0.500 ± 0.000"
    numeric = summary_table(RESULTS, formatted=False)
    assert numeric.loc["teacher", ("accuracy", "mean")] == pytest.approx(0.7)
    data = summary_json(RESULTS)
    text = json.dumps(data, allow_nan=False)  # strict JSON: NaN became null
    assert json.loads(text)["abmil"]["auc"] == {"mean": 0.6, "sd": None, "folds": [0.6, None]}
    assert data["teacher"]["auc"]["folds"] == [0.8, 0.9, 0.7]


def test_write_history(tmp_path):
    rows = [{"epoch": 1, "train_loss": 1.2, "val_auc": float("nan")}, {"epoch": 2, "train_loss": 0.9, "val_auc": 0.7}]
    csv_path, json_path = write_history(rows, tmp_path / "teacher" / "fold0_history")
    assert pd.read_csv(csv_path)["train_loss"].tolist() == [1.2, 0.9]
    assert json.loads(json_path.read_text())[0]["val_auc"] is None


def test_no_stray_warnings_on_a_clean_case():
    y = np.array([0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[[0, 1, 1, 0, 2, 2]] * 0.8 + 0.2 / 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(y_true=y, probs=probs)
    assert m["accuracy"] == pytest.approx(4 / 6)


# -- calibration ------------------------------------------------------------------------------


def test_brier_and_ece_by_hand():
    y = np.array([0, 1, 1, 0])
    perfect = np.eye(2)[y]
    cal = classification_metrics(y_true=y, probs=perfect)
    assert cal["brier"] == 0.0 and cal["ece"] == 0.0
    # always 90 % sure of class 0: right on half the patients -> ECE |0.5 - 0.9| = 0.4
    sure = np.tile([0.9, 0.1], (4, 1))
    cal = classification_metrics(y_true=y, probs=sure)
    assert cal["ece"] == pytest.approx(0.4)
    assert cal["brier"] == pytest.approx(np.mean([0.02, 1.62, 1.62, 0.02]))


def test_ece_of_calibrated_probabilities_is_small():
    rng = np.random.default_rng(0)
    p1 = rng.uniform(0, 1, 20000)
    y = (rng.uniform(0, 1, p1.size) < p1).astype(int)
    probs = np.stack([1 - p1, p1], axis=1)
    assert classification_metrics(y_true=y, probs=probs)["ece"] < 0.02
    # the same ranking pushed to the extremes keeps its AUC and loses its calibration
    sharp = np.stack([1 - p1**0.2, p1**0.2], axis=1)
    sharp = sharp / sharp.sum(axis=1, keepdims=True)
    assert classification_metrics(y_true=y, probs=sharp)["ece"] > 0.1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_integrated_brier_score_equals_scikit_survival(seed):
    sksurv_metrics = pytest.importorskip("sksurv.metrics")
    from sksurv.util import Surv

    rng = np.random.default_rng(seed)
    t = rng.exponential(10, 60).round(1) + 0.1  # rounded: deaths and censorings tie
    e = (rng.random(60) < 0.7).astype(int)
    at = np.array([3.0, 6.0, 9.0, 12.0])
    curves = np.exp(-at[None] / rng.uniform(5, 15, (60, 1)))
    y = Surv.from_arrays(e.astype(bool), t)
    expected = sksurv_metrics.integrated_brier_score(y, y, curves, at)
    got = survival_metrics(times=t, events=e, risks=-curves.sum(1), survival=curves, at=at)
    assert got["ibs"] == pytest.approx(expected, rel=1e-9)


def test_survival_calibration_in_the_large():
    rng = np.random.default_rng(3)
    t = rng.exponential(10, 4000)
    e = np.ones_like(t, dtype=int)
    at = np.array([5.0, 10.0, 20.0, np.inf])  # the last bin edge is open: skipped
    truth = np.tile(np.exp(-at / 10), (t.size, 1))
    right = survival_metrics(times=t, events=e, risks=np.zeros_like(t), survival=truth, at=at)
    wrong = survival_metrics(times=t, events=e, risks=np.zeros_like(t), survival=truth**3, at=at)
    assert right["calibration_gap"] < 0.02 < 0.1 < wrong["calibration_gap"]
    assert right["ibs"] < wrong["ibs"]
    # no curves: the ranking metrics only
    assert set(survival_metrics(times=t[:50], events=e[:50], risks=t[:50])) == {"c_index", "logrank_p"}
