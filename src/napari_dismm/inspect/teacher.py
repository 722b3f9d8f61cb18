"""The teacher's inputs for one patient: normalised tumor/TME gene vectors from an
expression table, with the statistics stored in the teacher's model directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from napari_dismm.errors import DataError, ModelConfigError


def teacher_genes(model_dir: str | os.PathLike[str], expression: str | os.PathLike[str],
                  patient: str) -> dict[str, np.ndarray]:
    """``{"tumor": (G_T,), "tme": (G_E,)}`` for ``patient`` (TCGA barcodes: first 12 characters)."""
    from napari_dismm.omics import ExpressionNormaliser, read_expression
    from napari_dismm.omics.patients import patient_id

    config = Path(model_dir) / "config.json"
    if not config.is_file():
        raise ModelConfigError(f"{model_dir} has no config.json")
    document = json.loads(config.read_text())
    if document.get("model", {}).get("kind") != "teacher" or not document.get("normaliser"):
        raise ModelConfigError(f"{model_dir} is not a teacher with stored expression statistics")
    normaliser = ExpressionNormaliser.from_dict(document["normaliser"])
    genes = [g for group in normaliser.groups_.values() for g in group]
    table = read_expression(expression, genes=genes)
    wanted = patient_id(str(patient).strip())
    if wanted not in set(table.patients):
        raise DataError(f"patient {patient!r} is not in the expression table {expression}")
    vectors = table.vectors([wanted], normaliser)
    return {u: v[0].astype(np.float32) for u, v in vectors.items()}
