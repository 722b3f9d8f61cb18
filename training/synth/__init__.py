"""Planted synthetic cohorts with known signal, for tests, recipes and `dismm synth`.

``layout`` draws a cohort in memory (regions, hidden states, expression; the regimes),
``files`` writes it to disk as a user's cohort would arrive (cohort CSV, feature h5, an
expression table, a GMT, plus the ground truth), and ``rendered`` paints it into real
pyramidal slides whose features come from a real encoder (the demo model's cohort).
"""

from training.synth.files import (
    MAG_NUMBER,
    REGIMES,
    CohortFiles,
    pick_genes,
    planted_cohort_config,
    regime_config,
    write_synthetic_cohort,
)

__all__ = ["MAG_NUMBER", "REGIMES", "CohortFiles", "pick_genes", "planted_cohort_config", "regime_config",
           "write_synthetic_cohort"]
