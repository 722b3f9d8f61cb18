"""Teacher vs student: where did the student learn the teacher's view of the slide?

Both models' attention over the same patches (matched by position and magnification) is
compared per subspace with a rank correlation (Spearman): 1 = the same patches rank high,
0 = unrelated. Works from two bundles' patch tables, so neither model needs to be at hand.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from napari_dismm.errors import DataError
from napari_dismm.inspect.consistency import map_agreement

COLUMNS = {"tumor": "tumor_attention", "tme": "tme_attention"}
KEYS = ["x", "y", "magnification"]


def matched_patches(student: pd.DataFrame, teacher: pd.DataFrame) -> pd.DataFrame:
    """One row per patch both tables hold: ``x, y, width, height, magnification`` and
    ``<column>_student`` / ``<column>_teacher`` for both attention columns."""
    cols = [*KEYS, *COLUMNS.values()]
    for name, frame in (("student", student), ("teacher", teacher)):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise DataError(f"{name} patch table lacks column(s) {', '.join(missing)}")
    s = student.assign(magnification=student["magnification"].astype(str))
    t = teacher.assign(magnification=teacher["magnification"].astype(str))
    merged = s[[*KEYS, "width", "height", *COLUMNS.values()]].merge(
        t[cols], on=KEYS, suffixes=("_student", "_teacher"), how="inner")
    if merged.empty:
        raise DataError("the student and teacher predictions share no patch (different slides or grids?)")
    return merged


def attention_agreement(student: pd.DataFrame, teacher: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """``{magnification: {subspace: {"spearman", "cosine", "n"}}}`` over the shared patches."""
    merged = matched_patches(student, teacher)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for mag, rows in merged.groupby("magnification", sort=True):
        out[str(mag)] = {}
        for u, column in COLUMNS.items():
            stats = map_agreement(rows[f"{column}_student"].to_numpy(), rows[f"{column}_teacher"].to_numpy())
            out[str(mag)][u] = {**stats, "n": int(len(rows))}
    return out


def rank_difference(merged: pd.DataFrame, subspace: str) -> np.ndarray:
    """Per shared patch, student percentile rank minus teacher percentile rank (within its
    magnification), in [-1, 1]: > 0 where the student attends more than the teacher."""
    column = COLUMNS[subspace]
    groups = merged.groupby("magnification", sort=False)
    s = groups[f"{column}_student"].rank(pct=True)
    t = groups[f"{column}_teacher"].rank(pct=True)
    return (s - t).to_numpy(np.float64)
