"""Fixtures shared by the training tests."""

from __future__ import annotations

import pytest

from training.cohort import load_cohort
from training.config import config_from_dict
from training.splits import split_cohort
from training.stages.supervised import prepare_fold
from tests.training.synth_files import write_cohort


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Fold 0 of a 16-patient planted cohort at a small width (the units of the loops)."""
    files = write_cohort(tmp_path_factory.mktemp("units"), n_patients=16, feature_dim=8)
    cohort = load_cohort(cohort_csv=files.csv, expression=files.expression, gene_sets=files.gmt, task="classification")
    cfg = config_from_dict({"model": {"d": 16, "dropout": 0.0}, "data": {"batch_size": 4}})
    split = split_cohort(cohort, n_folds=2, val_fraction=0.25, seed=0)
    return prepare_fold(cohort, split.folds[0], 0, cfg, use_genes=True)
