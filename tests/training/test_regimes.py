"""The teacher against single-modality models where only one modality carries the label
(issue 13): it must read the genes where the slide says nothing, and the slide where the
genes say nothing; and its predicted classes must follow its probabilities.

Small cohorts with a clear signal, so the test is stable and cheap; what it catches is a
teacher that cannot use one modality (the genes-only-query teacher sat at AUC 0.46 on the
genes regime). The full comparison over regimes and seeds is ``training.recipes.regimes``."""

from __future__ import annotations

import pytest

from training.recipes.regimes import run_regime

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the documented defaults, shorter: 64 patients (the regimes' size), 3 folds, 20 epochs. At 48
# patients a test fold has 16 patients and a validation part ~6, and one fold in which the
# teacher had not read the genes yet by epoch 20 decided the mean: on the genes regime, cohort
# seeds 5-8, the teacher lost a fold on two seeds of four (max confidence 1.000 / 0.776 / 1.000 /
# 0.849; with the magnifications' probabilities averaged 0.849 / 0.958 / 1.000 / 0.995;
# expression alone 0.984-1.000). At 64 patients, seeds 5, 6, 8: 0.994 / 0.955 / 0.989 (mean:
# 0.989 / 0.979 / 1.000) against 0.986 / 0.992 / 1.000.
CONFIG = {"model": {"d": 64}, "teacher": {"epochs": 20}, "baselines": {"epochs": 20}}
CASES = {
    # regime -> the single-modality models the teacher must match (the linear probe on
    # mean-pooled patch features is the stronger WSI-only model wherever the signal is spread)
    "genes": ("genes_only",),
    "slide": ("abmil", "meanpool_probe"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def regime(request, tmp_path_factory):
    name = request.param
    rows = run_regime(tmp_path_factory.mktemp(f"regime_{name}"), regime=name, seed=5, n_patients=64,
                      models=["teacher", *CASES[name]], config=CONFIG, maps=False, label_from="tumor")
    print(f"\n{name} regime: " + ", ".join(f"{m} AUC {r['auc']:.3f} accuracy {r['accuracy']:.3f}"
                                           for m, r in rows.items()))
    return name, rows


@pytest.mark.slow
def test_teacher_matches_the_modality_that_carries_the_label(regime):
    name, rows = regime
    best = max(rows[m]["auc"] for m in CASES[name])
    assert rows["teacher"]["auc"] >= best - 0.02, rows


@pytest.mark.slow
def test_predicted_classes_follow_the_probabilities(regime):
    """Accuracy far above chance wherever AUC is high: 0.50 accuracy at 0.92 AUC (issue 13)
    was a broken decision rule, not a weak model."""
    _, rows = regime
    for model, row in rows.items():
        if row["auc"] >= 0.9:
            assert row["accuracy"] >= 0.75, (model, row)
