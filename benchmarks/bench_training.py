"""Training throughput (slides/s) of the teacher and the student on the planted cohort, and
the DDP run's throughput with 2 processes divided by 1 process, measured side by side.

    python benchmarks/bench_training.py [--patients 64] [--epochs 3] [--threads 1]

Slides/s counts training slides through forward + backward + optimizer step (CGC and DEV
on for the teacher; the frozen teacher's forward included for the student), excluding
validation. The DDP figures run the same teacher epochs under torchrun (gloo, CPU) with 1
and with 2 processes, one thread each, global batch 8 (4 per process with 2), so the ratio
is the scaling of the loop itself on this machine (2 cores; other load on the machine
lowers it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _setup(root: Path, patients: int):
    from training.cohort import load_cohort
    from training.config import config_from_dict
    from training.splits import split_cohort
    from training.stages.supervised import prepare_fold
    from training.synth import planted_cohort_config, write_synthetic_cohort

    if not (root / "cohort.csv").exists():
        write_synthetic_cohort(root, config=planted_cohort_config(n_patients=patients), n_tumor_genes=16, n_tme_genes=16)
    cohort = load_cohort(cohort_csv=root / "cohort.csv", expression=root / "expression.tsv",
                         gene_sets=root / "sets.gmt", task="classification")
    cfg = config_from_dict({"model": {"d": 64, "dropout": 0.1}, "data": {"batch_size": 8}})
    split = split_cohort(cohort, n_folds=3, val_fraction=0.2, seed=0)
    setup = prepare_fold(cohort, split.folds[0], 0, cfg, use_genes=True)
    setup.data.train.preload()
    return setup


def _objective(kind: str, setup):
    import torch

    from napari_dismm.model.registry import build_model
    from training.stages.supervised import SupervisedObjective, model_config
    from training.stages.distillation import DistillationObjective, teacher_prototypes

    torch.manual_seed(0)
    teacher = build_model(model_config("teacher", setup))
    if kind == "teacher":
        obj = SupervisedObjective(teacher, task=setup.task, class_weights=setup.class_weights, dev_weight=1.0, cgc=True,
                                  patch_size_10x_level0=setup.patch_size_10x_level0)
        return teacher, obj
    student = build_model(model_config("student", setup))
    for mag, per in teacher_prototypes(teacher.eval(), setup.data.train).items():
        student.set_subspace_prototypes(per["tumor"], per["tme"], magnification=mag)
    obj = DistillationObjective(teacher, task=setup.task, class_weights=setup.class_weights, temperature=2.0,
                                lambda_kd=0.01, lambda_f=0.01)
    return student, obj


def _epochs(model, net, obj, setup, epochs: int, ctx) -> tuple[float, int]:
    """Seconds and local slides of ``epochs`` training epochs (after one warm-up step)."""
    import torch

    from training.dataset import collate_bags
    from training.ddp import epoch_batches

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train = setup.data.train

    def step(idx):
        batch = collate_bags([train[i] for i in idx])
        opt.zero_grad(set_to_none=True)
        loss, _ = obj.train_loss(net, batch)
        loss.backward()
        obj.after_backward()
        opt.step()

    step(epoch_batches(len(train), batch_size=8, seed=0, epoch=0, ctx=ctx)[0])
    slides, start = 0, time.perf_counter()
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for idx in epoch_batches(len(train), batch_size=8, seed=0, epoch=epoch, ctx=ctx):
            step(idx)
            slides += len(idx)
    return time.perf_counter() - start, slides


def _ddp_worker(root: Path, patients: int, epochs: int) -> None:
    import torch

    from training.ddp import barrier, distributed_from_env, wrap

    torch.set_num_threads(1)
    with distributed_from_env() as ctx:
        setup = _setup(root, patients)
        model, obj = _objective("teacher", setup)
        net = wrap(model, ctx)
        barrier(ctx)
        seconds, slides = _epochs(model, net, obj, setup, epochs, ctx)
        barrier(ctx)
        if ctx.is_main:
            print(json.dumps({"seconds": seconds, "slides": slides * ctx.world_size}))


def _torchrun(nproc: int, root: Path, patients: int, epochs: int) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), __file__, "--ddp-worker", "--root", str(root),
           "--patients", str(patients), "--epochs", str(epochs)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        _ddp_worker(args.root, args.patients, args.epochs)
        return
    import torch

    from training.ddp import SINGLE

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cohort"
        setup = _setup(root, args.patients)
        print(f"planted cohort: {args.patients} patients, {len(setup.data.train)} training slides in fold 0, "
              f"64-d features, ~{int(setup.data.train[0].bags['20x'].shape[0])} patches at 20x; "
              f"{args.threads} torch thread(s), load average {os.getloadavg()[0]:.1f}")
        rates = {}
        for kind in ("teacher", "student"):
            model, obj = _objective(kind, setup)
            seconds, slides = _epochs(model, model, obj, setup, args.epochs, SINGLE)
            rates[kind] = slides / seconds
            print(f"{kind:8s} {slides:4d} slides in {seconds:6.2f} s = {rates[kind]:7.1f} slides/s")
        print(f"student / teacher time per slide: {rates['teacher'] / rates['student']:.2f}x")
        one = _torchrun(1, root, args.patients, args.epochs)
        two = _torchrun(2, root, args.patients, args.epochs)
        r1, r2 = one["slides"] / one["seconds"], two["slides"] / two["seconds"]
        print(f"DDP teacher, 1 process : {r1:7.1f} slides/s")
        print(f"DDP teacher, 2 processes: {r2:7.1f} slides/s")
        print(f"DDP throughput 2 processes / 1 process: {r2 / r1:.2f}x")


if __name__ == "__main__":
    main()
