"""Figures of a run: ROC per class, Kaplan-Meier of risk groups, training curves.

Built with matplotlib's object API on an Agg canvas (no pyplot), so drawing never picks or
changes a GUI backend, works headless, and leaks no global figure state between calls.
Each function takes data and an output path and returns the path of the PNG it wrote.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from napari_dismm.errors import DataError
from training.metrics import risk_groups


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_roc(
    *,
    y_true: Sequence[int],
    probs: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "ROC (held-out)",
) -> Path:
    """One-vs-rest ROC curve per class (binary: the positive class only), AUC in the legend."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or p.shape != (len(y), len(class_names)):
        raise DataError(f"probs must be ({len(y)}, {len(class_names)}), got {p.shape}")
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    classes = [1] if len(class_names) == 2 else range(len(class_names))
    for c in classes:
        positive = y == c
        if positive.all() or not positive.any():
            continue  # undefined for this class in these patients
        fpr, tpr, _ = roc_curve(positive, p[:, c])
        ax.plot(fpr, tpr, label=f"{class_names[c]} (AUC {roc_auc_score(positive, p[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_km(
    *,
    times: Sequence[float],
    events: Sequence[int],
    risks: Sequence[float],
    path: str | os.PathLike[str],
    title: str = "Kaplan-Meier by predicted risk",
) -> Path:
    """Survival of the low- and high-risk halves (median split), log-rank p in the title."""
    groups = risk_groups(times=times, events=events, risks=risks)
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    colours = {"low risk": "tab:blue", "high risk": "tab:red"}
    for name, (timeline, survival) in groups.curves.items():
        n = int(groups.high.sum() if name == "high risk" else (~groups.high).sum())
        ax.step(timeline, survival, where="post", color=colours[name], label=f"{name} (n={n})")
    p = groups.logrank_p
    ax.set(xlabel="time", ylabel="survival probability", ylim=(0, 1.02),
           title=f"{title}\nlog-rank p = {p:.3g}" if np.isfinite(p) else f"{title}\nlog-rank p undefined")
    ax.legend(loc="lower left", fontsize="small")
    return _save(fig, path)


def plot_training_curves(
    *,
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    x: str = "epoch",
    title: str = "training curves",
) -> Path:
    """Per-epoch rows: keys with "loss" on the left panel, other numbers on the right."""
    if not history:
        raise DataError("no epoch to plot")
    keys = list(dict.fromkeys(k for row in history for k in row if k != x))
    numeric = [k for k in keys if all(isinstance(r.get(k, np.nan), (int, float)) for r in history)]
    losses = [k for k in numeric if "loss" in k]
    others = [k for k in numeric if "loss" not in k]
    xs = [row.get(x, i) for i, row in enumerate(history)]
    fig = Figure(figsize=(10, 4))
    for i, (group, label) in enumerate(((losses, "loss"), (others, "metric"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for k in group:
            ax.plot(xs, [float(r.get(k, np.nan)) for r in history], marker=".", label=k)
        ax.set(xlabel=x, ylabel=label)
        if group:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)
