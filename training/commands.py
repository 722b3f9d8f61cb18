"""`dismm train`, `dismm evaluate`, `dismm synth` and `dismm inspect`, registered through entry points.

Each ``register_*`` adds one subparser to the `dismm` command and sets its handler
(args -> exit code). Heavy imports (torch, pandas, the loops) happen inside the handlers,
so `dismm --help` stays instant. User errors are DismmError subclasses, which the CLI
prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASK_CHOICES = ("classification", "survival")


def register_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train the DisMM teacher, student and baselines with patient-level cross-validation",
        description="Stage I teacher, stage II student and the baselines over the same folds. "
        "Starting the same command again resumes an interrupted run. Runs under torchrun (DDP) too.",
    )
    p.add_argument("--cohort", type=Path, required=True, help="cohort CSV (patient_id, slide_id, features_10x, ...)")
    p.add_argument("--expression", type=Path, required=True, help="expression table (TSV/CSV)")
    p.add_argument("--gene-sets", type=Path, default=None, help="GMT with TUMOR* and TME* sets (default: shipped)")
    p.add_argument("--task", choices=TASK_CHOICES, required=True)
    p.add_argument("--out", type=Path, required=True, help="run directory (created; reused to resume)")
    p.add_argument("--config", type=Path, default=None, help="TOML config (default: the documented defaults)")
    p.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help="models to train (default: teacher student + [baselines] run)")
    p.add_argument("--ablations", action="store_true", help="also train the teacher with CGC off and with DEV off")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's)")
    p.set_defaults(handler=_train)


def register_evaluate(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="summary table of a training run (mean ± sd over folds)")
    p.add_argument("run_dir", type=Path, help="output directory of `dismm train`")
    p.add_argument("--json", action="store_true", help="print {model: {metric: {mean, sd, folds}}} as JSON")
    p.set_defaults(handler=_evaluate)


def register_synth(subparsers) -> None:
    p = subparsers.add_parser("synth", help="write a synthetic cohort with planted signal (for trying `dismm train`)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--task", choices=TASK_CHOICES, default="classification")
    p.add_argument("--patients", type=int, default=64, help="number of patients (>= 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tumor-genes", type=int, default=16, help="tumor genes taken from the shipped sets")
    p.add_argument("--tme-genes", type=int, default=16, help="TME genes taken from the shipped sets")
    p.add_argument("--regime", default="both", help="where the label's signal lives: both (default), genes, slide, "
                   "weak, small_region, tme_independent")
    p.add_argument("--patch-signal", type=float, default=None, help="state signal in planted patches (regime's)")
    p.add_argument("--gene-signal", type=float, default=None, help="state shift of informative genes (regime's)")
    p.add_argument("--region-fraction", type=float, default=None, help="share of tissue per planted region")
    p.add_argument("--feature-dim", type=int, default=64, help="patch feature width D (default 64; 1024 as ResNet-50)")
    p.add_argument("--patches-20x", type=int, default=None, metavar="N",
                   help="real scale: about N 20x patches per slide (each within 20 %%; 10x: a quarter, same tissue); "
                   "default: small slides of a few hundred")
    p.add_argument("--scanner-mix", type=float, default=None, metavar="F",
                   help="share of slides scanned at 0.25 um/px (footprints and coordinate lattice doubled), "
                   "the rest at 0.5 um/px (default 1: all at 0.25)")
    p.set_defaults(handler=_synth)


def register_inspect(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect", help="disentanglement figures of a training run (tumor vs TME CKA, 10x/20x consistency, genes)",
        description="For each model of RUN_DIR, on each fold's held-out patients: linear CKA and cosine between "
        "the tumor and TME slide features per magnification, 10x vs 20x attention consistency per slide, "
        "integrated-gradients gene attribution per subspace (teachers) and a PCA of slide features. Writes "
        "OUT/*.png and OUT/summary.json. The cohort files are those given to `dismm train`.",
    )
    p.add_argument("run_dir", type=Path, help="output directory of `dismm train`")
    p.add_argument("--out", type=Path, required=True, help="directory for the figures and summary.json")
    p.add_argument("--cohort", type=Path, required=True, help="the run's cohort CSV")
    p.add_argument("--expression", type=Path, default=None, help="the run's expression table (needed for teachers)")
    p.add_argument("--gene-sets", type=Path, default=None, help="the run's GMT (default: shipped)")
    p.add_argument("--models", nargs="+", default=None, metavar="NAME", help="models to inspect (default: all)")
    p.add_argument("--ig-steps", type=int, default=8, help="integrated-gradients steps (default 8)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of one line per model")
    p.set_defaults(handler=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    from napari_dismm.cli import require_output_dir
    from napari_dismm.errors import DataError
    from training.inspect import headline, inspect_run

    require_output_dir(args.out)
    if args.ig_steps < 1:
        raise DataError(f"--ig-steps must be >= 1, got {args.ig_steps}")
    summary = inspect_run(args.run_dir, cohort_csv=args.cohort, expression=args.expression, gene_sets=args.gene_sets,
                          out=args.out, models=args.models, ig_steps=args.ig_steps,
                          log=lambda msg: print(msg, file=sys.stderr))
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(headline(summary))
        print(f"figures and summary.json in {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from napari_dismm.cli import require_output_dir
    from napari_dismm.errors import DataError
    from training.ddp import distributed_from_env
    from training.run import format_table, run_training

    require_output_dir(args.out)
    if args.threads is not None:
        if args.threads < 1:
            raise DataError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    with distributed_from_env() as ctx:
        run_training(cohort_csv=args.cohort, expression=args.expression, gene_sets=args.gene_sets, task=args.task,
                     out=args.out, config=args.config, models=args.models, ablations=args.ablations, ctx=ctx,
                     log=lambda msg: print(msg, file=sys.stderr), progress=True)
        if ctx.is_main:
            print(format_table(args.out))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from training.run import collect_summary, format_table

    if args.json:
        print(json.dumps(collect_summary(args.run_dir), indent=1))
    else:
        print(format_table(args.run_dir))
    return 0


def _synth(args: argparse.Namespace) -> int:
    from napari_dismm.cli import require_output_dir
    from napari_dismm.errors import DataError
    from training.synth import regime_config, write_synthetic_cohort

    require_output_dir(args.out)
    if args.patients < 8:
        raise DataError(f"--patients must be >= 8, got {args.patients}")
    overrides = {key: value for key, value in (("patch_signal", args.patch_signal), ("gene_signal", args.gene_signal),
                                               ("region_fraction", args.region_fraction),
                                               ("patches_20x", args.patches_20x),
                                               ("scanner_mix", args.scanner_mix)) if value is not None}
    try:
        config = regime_config(args.regime, task=args.task, n_patients=args.patients, seed=args.seed,
                               feature_dim=args.feature_dim, **overrides)
    except ValueError as error:
        message = str(error)
        for key in ("patch_signal", "gene_signal", "region_fraction", "patches_20x", "scanner_mix", "feature_dim"):
            message = message.replace(key, "--" + key.replace("_", "-"))
        raise DataError(f"dismm synth: {message}") from error
    files = write_synthetic_cohort(
        args.out, config=config,
        n_tumor_genes=args.tumor_genes, n_tme_genes=args.tme_genes, keep_features=False,
    )
    print(f"wrote {len(files.synth.patients)} patients to {files.root}: {files.csv.name}, "
          f"{files.expression.name}, {files.gmt.name}, features/, truth.csv, regions.csv")
    print(f"train with: dismm train --cohort {files.csv} --expression {files.expression} "
          f"--gene-sets {files.gmt} --task {args.task} --out RUN_DIR")
    return 0
