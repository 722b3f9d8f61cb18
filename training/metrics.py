"""Held-out metrics, per fold and summarised over folds (mean ± sd).

Classification uses scikit-learn on class probabilities; survival uses lifelines. Risk is
"higher = worse" throughout (the model's risk = -sum of the survival curve), so the
C-index gets the negated risk: lifelines scores *survival* predictions, where higher means
longer life. Metrics are computed per patient: a patient with several slides counts once
(``by_patient`` averages the slide predictions first).
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from napari_dismm.errors import DataError, DismmWarning

CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "auc", "f1_macro", "brier", "ece")
SURVIVAL_METRICS = ("c_index", "logrank_p", "ibs", "calibration_gap")
#: confidence bins of the expected calibration error
ECE_BINS = 10


# -- patients --------------------------------------------------------------------------


def by_patient(patient_ids: Sequence[str], values: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Mean of the rows of each patient (first-seen order): one prediction per patient."""
    values = np.asarray(values, dtype=float)
    if len(patient_ids) != len(values):
        raise DataError(f"{len(patient_ids)} patient ids for {len(values)} predictions")
    order = list(dict.fromkeys(patient_ids))
    index = {p: i for i, p in enumerate(order)}
    rows = np.array([index[p] for p in patient_ids])
    sums = np.zeros((len(order),) + values.shape[1:])
    np.add.at(sums, rows, values)
    counts = np.bincount(rows, minlength=len(order)).reshape((-1,) + (1,) * (values.ndim - 1))
    return order, sums / counts


# -- classification ----------------------------------------------------------------------


def macro_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """One-vs-rest AUC averaged over classes; binary: the AUC of class 1's probability.

    A class absent from ``y_true`` (or the only class present) has no defined AUC; it is
    left out of the average with a warning, and NaN is returned when no class is left.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=float)
    n_classes = probs.shape[1]
    if n_classes == 2:
        if len(np.unique(y_true)) < 2:
            warnings.warn("AUC undefined: only one class among the held-out patients", DismmWarning, stacklevel=2)
            return float("nan")
        return float(roc_auc_score(y_true == 1, probs[:, 1]))
    aucs, skipped = [], []
    for c in range(n_classes):
        positive = y_true == c
        if positive.all() or not positive.any():
            skipped.append(c)
            continue
        aucs.append(roc_auc_score(positive, probs[:, c]))
    if skipped:
        warnings.warn(
            f"AUC of class(es) {skipped} undefined in this fold (absent or alone); macro AUC over the others",
            DismmWarning,
            stacklevel=2,
        )
    return float(np.mean(aucs)) if aucs else float("nan")


def classification_metrics(*, y_true: Sequence[int], probs: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro one-vs-rest AUC and macro F1 of argmax predictions;
    and how far the probabilities can be taken at their word: the multi-class Brier score and
    the expected calibration error of the top class (``calibration``)."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or p.shape[0] != len(y) or p.shape[1] < 2:
        raise DataError(f"probs must be (n, n_classes >= 2) for {len(y)} labels, got {p.shape}")
    if len(y) == 0:
        raise DataError("no held-out predictions to score")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise DataError(f"labels outside [0, {p.shape[1]})")
    pred = p.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # y_pred classes absent from y_true
        balanced = balanced_accuracy_score(y, pred)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced),
        "auc": macro_auc(y, p),
        "f1_macro": float(f1_score(y, pred, average="macro", zero_division=0)),
        **calibration(y, p),
    }


def calibration(y: np.ndarray, probs: np.ndarray, *, n_bins: int = ECE_BINS) -> dict[str, float]:
    """``brier``: mean over patients of sum_c (p_c - [y = c])^2 (0 = perfect, 2 = worst).
    ``ece``: expected calibration error of the top class, |accuracy - mean confidence|
    averaged over ``n_bins`` equal-width confidence bins weighted by their patients: a
    model whose 0.9-confident calls are right 60 % of the time is not to be trusted."""
    onehot = np.eye(probs.shape[1])[y]
    brier = float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))
    conf, hit = probs.max(axis=1), (probs.argmax(axis=1) == y).astype(float)
    which = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = sum(abs(hit[which == b].mean() - conf[which == b].mean()) * np.mean(which == b)
              for b in range(n_bins) if np.any(which == b))
    return {"brier": brier, "ece": float(ece)}


# -- survival ------------------------------------------------------------------------------


def c_index(*, times: Sequence[float], events: Sequence[int], risks: Sequence[float]) -> float:
    """Harrell's C: the fraction of comparable pairs whose higher risk died first."""
    t, e, r = (np.asarray(a, dtype=float) for a in (times, events, risks))
    if not (len(t) == len(e) == len(r)) or len(t) < 2:
        raise DataError("c_index needs >= 2 patients with times, events and risks of one length")
    if not e.any():
        return float("nan")  # no comparable pair
    return float(concordance_index(t, -r, e))


@dataclass(frozen=True)
class RiskGroups:
    """A median split of held-out risk, the groups' Kaplan-Meier curves and the log-rank p."""

    high: np.ndarray
    threshold: float
    curves: dict[str, tuple[np.ndarray, np.ndarray]]
    logrank_p: float


def risk_groups(
    *, times: Sequence[float], events: Sequence[int], risks: Sequence[float], threshold: float | None = None
) -> RiskGroups:
    """High risk = risk above ``threshold`` (default: the median of these risks).

    The curves map "low risk" / "high risk" to (timeline, survival); a group with no
    patient has no curve and the log-rank p is NaN.
    """
    t, e, r = (np.asarray(a, dtype=float) for a in (times, events, risks))
    cut = float(np.median(r)) if threshold is None else float(threshold)
    high = r > cut
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, members in (("low risk", ~high), ("high risk", high)):
        if members.any():
            km = KaplanMeierFitter().fit(t[members], e[members], label=name)
            sf = km.survival_function_
            curves[name] = (sf.index.to_numpy(dtype=float), sf.iloc[:, 0].to_numpy(dtype=float))
    p = float("nan")
    if high.any() and (~high).any() and e.any():
        p = float(logrank_test(t[high], t[~high], e[high], e[~high]).p_value)
    return RiskGroups(high=high, threshold=cut, curves=curves, logrank_p=p)


def survival_metrics(*, times: Sequence[float], events: Sequence[int], risks: Sequence[float],
                     survival: np.ndarray | None = None, at: Sequence[float] | None = None) -> dict[str, float]:
    """C-index and the log-rank p of the median risk split; with the predicted survival
    curves (``survival[i, k]`` = S(``at[k]``) for patient i), their calibration too
    (``survival_calibration``): a ranking can be right while the probabilities are not."""
    metrics = {
        "c_index": c_index(times=times, events=events, risks=risks),
        "logrank_p": risk_groups(times=times, events=events, risks=risks).logrank_p,
    }
    if survival is not None and at is not None:
        metrics.update(survival_calibration(times=times, events=events, survival=survival, at=at))
    return metrics


def _censoring_survival(times: np.ndarray, events: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """G(t) = P(still uncensored after t): Kaplan-Meier of the censoring times, where a death
    and a censoring at the same time count the death first (the censored patient was still
    at risk of dying then; scikit-survival's convention)."""
    grid = np.unique(times)
    at_risk = np.array([(times >= u).sum() for u in grid])
    deaths = np.array([((times == u) & (events == 1)).sum() for u in grid])
    censored = np.array([((times == u) & (events == 0)).sum() for u in grid])
    still = np.maximum(at_risk - deaths, 1)
    values = np.cumprod(1.0 - censored / still)

    def at(t: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(grid, t, side="right") - 1
        return np.where(idx >= 0, values[np.clip(idx, 0, None)], 1.0)

    return at


def survival_calibration(*, times: Sequence[float], events: Sequence[int], survival: np.ndarray,
                         at: Sequence[float]) -> dict[str, float]:
    """``ibs``: the integrated Brier score of the predicted S(t) over the time points ``at``
    that lie inside the follow-up (Graf et al. 1999, inverse-probability-of-censoring
    weights from these patients' own censoring; 0 = perfect, 0.25 = a constant 0.5).
    ``calibration_gap``: mean over those points of |mean predicted S(t) - Kaplan-Meier
    S(t)|, calibration in the large. NaN when no point lies inside the follow-up."""
    t, e = np.asarray(times, dtype=float), np.asarray(events, dtype=int)
    s, points = np.asarray(survival, dtype=float), np.asarray(at, dtype=float)
    if s.shape != (len(t), len(points)):
        raise DataError(f"survival must be (patients, time points) = ({len(t)}, {len(points)}), got {s.shape}")
    inside = np.isfinite(points) & (points > 0) & (points < t.max())
    if not inside.any():
        return {"ibs": float("nan"), "calibration_gap": float("nan")}
    s, points = s[:, inside], points[inside]
    censor = _censoring_survival(t, e)
    g_event = censor(t)
    briers = []
    for k, point in enumerate(points):
        died = (t <= point) & (e == 1)
        alive = t > point
        g_point = censor(np.array([point]))[0]
        term = np.where(died, s[:, k] ** 2 / np.where(g_event > 0, g_event, np.inf), 0.0)
        term = term + np.where(alive, (1 - s[:, k]) ** 2 / (g_point if g_point > 0 else np.inf), 0.0)
        briers.append(term.mean())
    briers_a = np.asarray(briers)
    ibs = float(briers_a[0]) if len(points) == 1 else float(np.sum(np.diff(points) * (briers_a[1:] + briers_a[:-1]) / 2) / (points[-1] - points[0]))
    km = KaplanMeierFitter().fit(t, e).survival_function_at_times(points).to_numpy(dtype=float)
    gap = float(np.mean(np.abs(s.mean(axis=0) - km)))
    return {"ibs": ibs, "calibration_gap": gap}


# -- over folds -----------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


def _metric_names(per_fold: Sequence[Mapping[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for fold in per_fold:
        for k, v in fold.items():
            if _number(v) is not None:
                names.setdefault(k, None)
    return list(names)


def _fold_values(per_fold: Sequence[Mapping[str, Any]], name: str) -> list[float]:
    return [float("nan") if _number(f.get(name)) is None else float(f[name]) for f in per_fold]


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample sd (ddof=1) of the finite values; sd is NaN with fewer than two."""
    finite = np.array([v for v in values if math.isfinite(v)])
    if finite.size == 0:
        return float("nan"), float("nan")
    sd = float(np.std(finite, ddof=1)) if finite.size > 1 else float("nan")
    return float(finite.mean()), sd


def summarise(per_fold: Sequence[Mapping[str, Any]]) -> dict[str, tuple[float, float]]:
    """metric -> (mean, sd) over folds; non-numeric entries are ignored, NaN folds skipped."""
    return {name: _mean_sd(_fold_values(per_fold, name)) for name in _metric_names(per_fold)}


def summary_table(results: Mapping[str, Sequence[Mapping[str, Any]]], *, formatted: bool = True) -> pd.DataFrame:
    """One row per model; ``formatted``: cells "0.812 ± 0.034", else (metric, mean|sd) columns."""
    rows: dict[str, dict[Any, Any]] = {}
    for model, per_fold in results.items():
        row: dict[Any, Any] = {}
        for name, (mean, sd) in summarise(per_fold).items():
            if formatted:
                row[name] = f"{mean:.3f} ± {sd:.3f}" if math.isfinite(sd) else f"{mean:.3f}"
            else:
                row[(name, "mean")], row[(name, "sd")] = mean, sd
        rows[model] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    if not formatted and len(table.columns):
        table.columns = pd.MultiIndex.from_tuples(table.columns, names=["metric", "stat"])
    table.index.name = "model"
    return table


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def summary_json(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model: {metric: {"mean", "sd", "folds"}}}``; undefined numbers are null (valid JSON)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for model, per_fold in results.items():
        out[model] = {}
        for name in _metric_names(per_fold):
            values = _fold_values(per_fold, name)
            mean, sd = _mean_sd(values)
            out[model][name] = {
                "mean": _json_number(mean),
                "sd": _json_number(sd),
                "folds": [_json_number(v) for v in values],
            }
    return out


# -- per-epoch log --------------------------------------------------------------------------


def write_history(history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write per-epoch rows as ``<path>.csv`` and ``<path>.json`` (columns: union of keys)."""
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in history for k in row))
    csv_path, json_path = base.with_suffix(".csv"), base.with_suffix(".json")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    clean = [{k: (_json_number(v) if isinstance(v, float) else v) for k, v in row.items()} for row in history]
    json_path.write_text(json.dumps(clean, indent=1) + "\n")
    return csv_path, json_path
