"""10x vs 20x attention consistency per slide: what the DEV loss asks to be uniform.

DEV compares a slide's attention at the two magnifications after pooling the 20x map onto
the 10x patch grid (each 20x patch goes to the 10x patch containing its centre, by real
level-0 coordinates: :mod:`napari_dismm.model.grid`). Here the same pooling is done per
slide, and the agreement of the two maps on the common 10x grid is reported as

- ``cosine``: cosine of the 10x map and the pooled 20x map (the quantity behind the
  diagonal of DEV's similarity matrix; the per-slide DEV form uses their Pearson
  correlation instead, see :mod:`napari_dismm.model.losses`);
- ``spearman``: rank correlation of the two maps over the 10x patches that received any
  20x patch (does the same patch rank high at both magnifications?).

Works from arrays (a model's forward pass) or from a prediction bundle's ``patches.csv``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from napari_dismm.errors import DataError
from napari_dismm.model.grid import grid_index_20x_to_10x, pool_onto_10x

SUBSPACES = ("tumor", "tme")


def pooled_20x_on_10x(coords10: np.ndarray, coords20: np.ndarray, values20: np.ndarray, *,
                      patch_size_10x_level0: float, patch_size_20x_level0: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pooled (N10,), covered (N10,) bool): 20x values summed into the 10x patches."""
    c10 = torch.as_tensor(np.asarray(coords10, dtype=np.float64)).reshape(1, -1, 2)
    c20 = torch.as_tensor(np.asarray(coords20, dtype=np.float64)).reshape(1, -1, 2)
    v20 = torch.as_tensor(np.asarray(values20, dtype=np.float64)).reshape(1, -1)
    if c20.shape[1] != v20.shape[1]:
        raise DataError(f"{c20.shape[1]} 20x coordinates but {v20.shape[1]} values")
    index = grid_index_20x_to_10x(c10, c20, None, None, patch_size_10x_level0=patch_size_10x_level0,
                                  patch_size_20x_level0=patch_size_20x_level0)
    pooled = pool_onto_10x(v20, index, c10.shape[1])[0].numpy()
    covered = np.zeros(c10.shape[1], dtype=bool)
    hit = index[0].numpy()
    covered[hit[hit >= 0]] = True
    return pooled, covered


def map_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Cosine and Spearman correlation of two maps over the same patches."""
    from scipy.stats import spearmanr

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise DataError(f"maps differ in shape: {a.shape} vs {b.shape}")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cosine = float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        rho = float("nan")
    else:
        rho = float(spearmanr(a, b).statistic)
    return {"cosine": cosine, "spearman": rho}


def slide_consistency(coords: dict[str, np.ndarray], attention: dict[str, dict[str, np.ndarray]], *,
                      patch_size_10x_level0: float, patch_size_20x_level0: float | None = None) -> dict[str, dict[str, float]]:
    """Per subspace, the agreement of the 10x map and the 20x map pooled onto the 10x grid."""
    if "10x" not in coords or "20x" not in coords:
        raise DataError(f"consistency needs 10x and 20x attention, got {sorted(coords)}")
    out = {}
    for u in SUBSPACES:
        if u not in attention.get("10x", {}) or u not in attention.get("20x", {}):
            continue
        pooled, covered = pooled_20x_on_10x(coords["10x"], coords["20x"], attention["20x"][u],
                                            patch_size_10x_level0=patch_size_10x_level0,
                                            patch_size_20x_level0=patch_size_20x_level0)
        a10 = np.asarray(attention["10x"][u], dtype=np.float64)
        agreement = map_agreement(a10[covered], pooled[covered])
        agreement["cosine"] = map_agreement(a10, pooled)["cosine"]  # DEV's diagonal: the whole grid
        out[u] = {**agreement, "n_10x": int(len(a10)), "n_covered": int(covered.sum())}
    return out


def bundle_consistency(patches: pd.DataFrame) -> dict[str, dict[str, float]]:
    """:func:`slide_consistency` from a bundle's patch table (``x, y, width, magnification, ...``)."""
    by_mag = {str(m): g for m, g in patches.groupby(patches["magnification"].astype(str), sort=False)}
    if "10x" not in by_mag or "20x" not in by_mag:
        raise DataError(f"the bundle has patches at {sorted(by_mag)}; consistency needs 10x and 20x")
    coords = {m: g[["x", "y"]].to_numpy(np.float64) for m, g in by_mag.items()}
    attention = {m: {"tumor": g["tumor_attention"].to_numpy(), "tme": g["tme_attention"].to_numpy()}
                 for m, g in by_mag.items()}
    return slide_consistency(coords, attention, patch_size_10x_level0=float(by_mag["10x"]["width"].median()),
                             patch_size_20x_level0=float(by_mag["20x"]["width"].median()))
