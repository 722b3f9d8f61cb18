"""Cohort context for one slide: where does its prediction sit among the training cohort's?

Reads a `dismm train` run directory (``RUN/<model>/fold_<k>/test_predictions.csv``, the
held-out predictions; ``best/model.safetensors`` to recognise which fold's model made the
slide's prediction). Risk scales differ between folds, so when the slide's model is one
fold's model the comparison uses that fold's held-out patients; otherwise each fold's
risks are turned into within-fold ranks and pooled, and the slide is placed by rank.

Survival: the risk percentile and Kaplan-Meier curves (lifelines) of the cohort split
at the median risk (within each fold); classification: the percentile of the predicted
class's probability among the cohort's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from napari_dismm.errors import DataError


@dataclass
class CohortContext:
    model: str
    fold: int | None  # the fold whose model made the prediction, None = pooled over folds
    task: str
    percentile: float  # 0..100: share of cohort values below the slide's (ties count half)
    value_name: str  # "risk" or "probability of <class>"
    cohort_values: np.ndarray
    n_patients: int
    km: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # group -> (times, S)
    logrank_p: float | None = None


def _fold_frames(run: Path, model: str) -> dict[int, pd.DataFrame]:
    frames = {}
    for path in sorted((run / model).glob("fold_*/test_predictions.csv")):
        frames[int(path.parent.name.split("_")[-1])] = pd.read_csv(path)
    return frames


def _matching_fold(run: Path, model: str, model_id: str | None) -> int | None:
    if not model_id:
        return None
    from napari_dismm.model.checkpoint import weights_id

    for weights in sorted((run / model).glob("fold_*/best/model.safetensors")):
        if weights_id(weights) == model_id:
            return int(weights.parent.parent.name.split("_")[-1])
    return None


def percentile_of(value: float, values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(100.0 * ((values < value).sum() + 0.5 * (values == value).sum()) / len(values))


def choose_model(run: Path, prediction) -> str:
    """The run's model that matches the prediction (by weights), else by kind, else the first."""
    candidates = sorted(p.parent.parent.name for p in run.glob("*/fold_*/test_predictions.csv"))
    candidates = list(dict.fromkeys(candidates))
    if not candidates:
        raise DataError(f"{run}: no held-out predictions (<model>/fold_<k>/test_predictions.csv); is it a `dismm train` output?")
    for name in candidates:
        if _matching_fold(run, name, getattr(prediction, "model_id", None)) is not None:
            return name
    kind = getattr(prediction, "model_kind", None)
    return kind if kind in candidates else candidates[0]


def cohort_context(run_dir: str | os.PathLike[str], prediction, *, model: str | None = None) -> CohortContext:
    """Place ``prediction`` (a :class:`~napari_dismm.bundle.Prediction`) in the run's cohort."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DataError(f"run directory not found: {run}")
    name = model or choose_model(run, prediction)
    frames = _fold_frames(run, name)
    if not frames:
        raise DataError(f"{run}: model {name!r} has no held-out predictions")
    fold = _matching_fold(run, name, getattr(prediction, "model_id", None))
    if prediction.task == "survival":
        if prediction.risk is None or "risk" not in next(iter(frames.values())):
            raise DataError("the prediction or the run has no risk (is the run a survival run?)")
        if fold is not None:
            table, column = frames[fold].copy(), "risk"
            percentile = percentile_of(float(prediction.risk), table["risk"].to_numpy())
        else:  # pooled: within-fold percentile ranks; the slide placed by its rank in each fold, averaged
            parts = []
            for f in frames.values():
                part = f.copy()
                part["rank"] = part["risk"].rank(pct=True)
                parts.append(part)
            table, column = pd.concat(parts, ignore_index=True), "rank"
            percentile = float(np.mean([percentile_of(float(prediction.risk), f["risk"].to_numpy())
                                        for f in frames.values()]))
        values = table[column].to_numpy(np.float64)
        context = CohortContext(name, fold, "survival", percentile, "risk", values, int(table["patient_id"].nunique()))
        _km(context, table, column, by_fold=fold is None)
        return context
    predicted = prediction.predicted_class
    column = f"prob_{predicted}"
    pooled = pd.concat([frames[fold]] if fold is not None else list(frames.values()), ignore_index=True)
    if column not in pooled:
        raise DataError(f"the run's predictions have no column {column!r} (another class set?)")
    probability = float(prediction.probabilities[list(prediction.class_names).index(predicted)])
    values = pooled[column].to_numpy(np.float64)
    return CohortContext(name, fold, "classification", percentile_of(probability, values),
                         f"probability of {predicted}", values, int(pooled["patient_id"].nunique()))


def _km(context: CohortContext, table: pd.DataFrame, column: str, *, by_fold: bool) -> None:
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    cut = table[column].median()
    high = table[column].to_numpy() > cut
    for label, keep in (("low risk", ~high), ("high risk", high)):
        if keep.sum() == 0:
            continue
        fitter = KaplanMeierFitter().fit(table["time"].to_numpy()[keep], table["event"].to_numpy()[keep])
        frame = fitter.survival_function_
        context.km[label] = (frame.index.to_numpy(np.float64), frame.iloc[:, 0].to_numpy(np.float64))
    if high.any() and (~high).any():
        test = logrank_test(table["time"][high], table["time"][~high], table["event"][high], table["event"][~high])
        context.logrank_p = float(test.p_value)
