"""DisMM and MIRROR side by side: `python -m training.recipes.compare_families [--out WORKDIR]`.

Why a recipe: the test suite trains the DisMM models beside MIRROR for one epoch only
(its time budget), so the comparison the issue asks for -- MIRROR's probes beside the
DisMM teacher and student, on the same patient-level folds -- is run here with every
model trained to its early stop, on the planted cohort with decoys (the variant on which
mean pooling cannot simply read the states; see tests/training/test_mirror.py).

Writes WORKDIR/run (the usual run directory: summary.csv/json, per-fold models) and
prints the summary table. Re-running resumes: finished folds are read back.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from training.config import config_from_dict
from training.mirror import MirrorSettings
from training.run import format_table, run_training
from training.synth import planted_cohort_config, write_synthetic_cohort

#: Decoys: every "other" patch carries a random-sign shift of this size along both state
#: directions, so the mean of a bag no longer reads the states; finding the planted patches
#: (which carry the type directions) does. Without decoys mean-pooling reads the planted
#: mean shift directly and wins (measured, 64 patients: mean-pool 0.983 vs MIRROR 0.875).
#: tests/training/test_mirror.py uses this cohort and the MIRROR settings below.
DECOY = 6.0
CONFIG = {
    "model": {"d": 64, "dropout": 0.1},
    "data": {"batch_size": 8},
    "teacher": {"epochs": 25, "lr": 2e-3, "patience": 8},
    "student": {"epochs": 30, "lr": 1e-3, "patience": 8},
}
#: A fixed schedule of 40 epochs, the last kept (MirrorSettings.select, measured there).
MIRROR = MirrorSettings(magnifications=("10x",), d=32, epochs=40, n_prototypes=16, lr=2e-3)
MODELS = ["teacher", "student", "meanpool_probe", "mirror_probe", "mirror_fewshot"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("compare_families"), help="work directory (resumable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic cohort")
    args = parser.parse_args(argv)
    config = dataclasses.replace(planted_cohort_config(task="classification", n_patients=64, seed=args.seed),
                                 decoy_signal=DECOY)
    files = write_synthetic_cohort(args.out / "cohort", config=config, n_tumor_genes=16, n_tme_genes=16)
    run_training(cohort_csv=files.csv, expression=files.expression, gene_sets=files.gmt, task="classification",
                 out=args.out / "run", config=config_from_dict(CONFIG), models=MODELS, mirror=MIRROR)
    print(format_table(args.out / "run"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
