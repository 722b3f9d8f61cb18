"""The disentanglement figures of `dismm inspect` (matplotlib, Agg: no display needed).

Each function takes plain numbers (the summary's), draws one figure, writes a PNG and
returns its path, so the figures can be redrawn from ``summary.json`` alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

GROUP_COLOURS = {"tumor": "tab:red", "tme": "tab:green"}


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_similarity(similarity: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]], path) -> Path:
    """Bars of tumor-vs-TME linear CKA and mean cosine per model and magnification, with
    the fold values as dots. ``similarity[model][mag] = {"cka": [per fold], "cosine": [...]}``."""
    models = list(similarity)
    mags = sorted({m for per in similarity.values() for m in per})
    fig = Figure(figsize=(4 + 1.2 * len(models), 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    width = 0.8 / max(len(mags), 1)
    for ax, key, label in ((axes[0], "cka", "linear CKA (tumor vs TME)"), (axes[1], "cosine", "mean cosine")):
        for j, mag in enumerate(mags):
            xs = np.arange(len(models)) + (j - (len(mags) - 1) / 2) * width
            for x, model in zip(xs, models):
                values = np.asarray(similarity[model].get(mag, {}).get(key, []), dtype=float)
                values = values[np.isfinite(values)]
                if values.size:
                    ax.bar(x, values.mean(), width=width * 0.9, color=f"C{j}", label=mag if x == xs[0] else None)
                    ax.scatter(np.full(values.size, x), values, color="black", s=8, zorder=3)
        ax.set_xticks(range(len(models)), models, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(label)
        if key == "cka":
            ax.set_ylim(0, 1.05)
        else:
            ax.axhline(0, color="grey", lw=0.8)
        ax.legend(fontsize=7, title="magnification", title_fontsize=7)
    fig.suptitle("Similarity of tumor and TME slide features (held-out patients)", fontsize=10)
    return _save(fig, path)


def plot_consistency(consistency: Mapping[str, Mapping[str, Sequence[float]]], path) -> Path:
    """Per model and subspace, the per-slide Spearman correlation of the 10x map and the
    20x map pooled onto the 10x grid. ``consistency[model][subspace] = [per slide]``."""
    models = list(consistency)
    fig = Figure(figsize=(4 + 1.2 * len(models), 3.2), layout="constrained")
    ax = fig.subplots()
    for j, u in enumerate(("tumor", "tme")):
        data = [np.asarray([v for v in consistency[m].get(u, []) if np.isfinite(v)]) for m in models]
        positions = np.arange(len(models)) + (j - 0.5) * 0.35
        shown = [d if d.size else np.array([np.nan]) for d in data]
        parts = ax.boxplot(shown, positions=positions, widths=0.3, patch_artist=True, showfliers=False)
        for box in parts["boxes"]:
            box.set_facecolor(GROUP_COLOURS[u])
            box.set_alpha(0.5)
        for x, d in zip(positions, data):
            ax.scatter(np.full(d.size, x), d, s=6, color="black", zorder=3)
        ax.plot([], [], color=GROUP_COLOURS[u], lw=6, alpha=0.5, label=u)
    ax.set_xticks(range(len(models)), models, rotation=20, ha="right", fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("Spearman, 10x vs pooled 20x attention")
    ax.set_title("Inter-magnification attention consistency per slide (DEV's target)", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_attribution(top: Mapping[str, Mapping[str, object]], path, *, title: str) -> Path:
    """Per subspace, the top genes by mean |integrated gradient|, coloured by gene group."""
    fig = Figure(figsize=(7.5, 3.6), layout="constrained")
    axes = fig.subplots(1, len(top), squeeze=False)[0]
    for ax, (u, info) in zip(axes, top.items()):
        rows = list(info["top"])[::-1]
        ax.barh(range(len(rows)), [r["mean_abs_ig"] for r in rows],
                color=[GROUP_COLOURS.get(r["group"], "grey") for r in rows])
        ax.set_yticks(range(len(rows)), [r["gene"] for r in rows], fontsize=7)
        share = info["share_by_group"]
        ax.set_title(f"{u} subspace (own genes: {share.get(u, float('nan')):.0%})", fontsize=9)
        ax.set_xlabel("mean |IG|", fontsize=8)
    for group, colour in GROUP_COLOURS.items():
        axes[0].plot([], [], color=colour, lw=6, label=f"{group} genes")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_projection(coords: Mapping[str, np.ndarray], ratios: Mapping[str, np.ndarray], colour, path, *,
                    title: str, colour_label: str, categorical: bool) -> Path:
    """PCA of slide features, one panel per feature kind (tumor, TME, both), coloured by label."""
    fig = Figure(figsize=(3.2 * len(coords) + 0.8, 3.3), layout="constrained")
    axes = fig.subplots(1, len(coords), squeeze=False)[0]
    colour = np.asarray(colour)
    for ax, (name, xy) in zip(axes, coords.items()):
        if categorical:
            for i, value in enumerate(dict.fromkeys(colour.tolist())):
                keep = colour == value
                ax.scatter(xy[keep, 0], xy[keep, 1], s=14, color=f"C{i}", label=str(value))
        else:
            points = ax.scatter(xy[:, 0], xy[:, 1], s=14, c=colour.astype(float), cmap="viridis")
        r = ratios[name]
        ax.set_xlabel(f"PC1 ({r[0]:.0%})", fontsize=8)
        ax.set_ylabel(f"PC2 ({r[1]:.0%})", fontsize=8)
        ax.set_title(f"{name} features", fontsize=9)
    if categorical:
        axes[-1].legend(fontsize=7, title=colour_label, title_fontsize=7)
    else:
        fig.colorbar(points, ax=axes[-1], label=colour_label)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
