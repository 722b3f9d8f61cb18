"""Real expression without download (sksurv's breast cancer, 198 patients): the gene path
with the survival head, C-index on held-out folds next to lifelines' CoxPH on the same folds."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sksurv")

from training.genes_only import breast_cancer_cohort, compare_on_folds, real_split  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_gene_sets_follow_the_documented_rule():
    cohort = breast_cancer_cohort()
    assert len(cohort.patients) == 198
    probes = sorted(cohort.table.columns)
    assert cohort.gene_sets.tumor == tuple(sorted(probes[:38])) and cohort.gene_sets.tme == tuple(sorted(probes[38:]))


def test_genes_only_c_index_next_to_coxph():
    """The gene path (five cross-fitted SNN + fusion-head members, training/genes_only.py)
    against CoxPH on the same folds. Its settings were chosen on split seeds 1 and 2 (0.689 /
    0.687 vs CoxPH 0.650 / 0.643); on this split (seed 0, used for no choice) it measured
    0.680 ± 0.061 vs 0.659 ± 0.101 (five members on one validation part: 0.657 ± 0.069; one
    member: 0.635 ± 0.067)."""
    cohort = breast_cancer_cohort()
    folds = compare_on_folds(cohort, real_split(cohort, n_folds=5, seed=0))
    ours = np.array([f["genes_only"] for f in folds])
    cox = np.array([f["coxph"] for f in folds])
    print(f"\nheld-out C-index over 5 folds: genes-only SNN {ours.mean():.3f} ± {ours.std(ddof=1):.3f}, "
          f"CoxPH (penalizer 0.1) {cox.mean():.3f} ± {cox.std(ddof=1):.3f}")
    assert ours.mean() > 0.58  # above chance on held-out patients
    assert ours.mean() >= cox.mean()  # at or above the classical model on the same folds
