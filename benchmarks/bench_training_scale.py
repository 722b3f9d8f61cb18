"""Cost of one teacher and one student training step against bag size: 1k, 10k and 50k
patches per bag at 20x (10x: a quarter), batches of 2 and 8 slides.

    python benchmarks/bench_training_scale.py [--sizes 1000 10000 50000] [--batches 2 8]
        [--dim 1024] [--steps 2] [--threads 1] [--root DIR] [--profile KIND N B]

A step is forward + backward + AdamW step with the default configuration of
``training/config.py`` (``model``, ``teacher`` and ``student`` sections as shipped), on whole
bags: ``[data] max_patches`` is lifted so the step sees every patch, which is what the
growth exponent is about (the shipped cap of 4096 bounds the training cost, not the
prediction cost). The student's step includes its frozen teacher's forward, as in stage
II. Bags come from a ``dismm synth`` cohort (half the slides at 0.25 µm/px, half at 0.5)
with ``--dim`` features (1024: ResNet-50 to layer3), read through the training dataset.

Each point runs in a fresh subprocess: build the model, collate the batch, one warm-up
step, then ``--steps`` timed steps (mean reported). Peak memory is the step's own: on CPU
the rise of the process's peak resident set (VmHWM, reset just before the warm-up step
through ``/proc/self/clear_refs``) over the resident set at that moment, so it excludes the
interpreter, torch and the collated batch (given separately as ``input MB``); on CUDA,
``torch.cuda.max_memory_allocated`` over the allocation before the step. Time is wall
seconds and, on CPU, the process's CPU seconds, which with one thread is the work done
whatever else loads the machine. Growth exponent: the log-log slope of time (CPU time on
CPU) and of step memory from the smallest to the largest size, and between the two
largest; 1.0 is linear, the goal is <= 1.15.

``--profile KIND N B`` prints, for one step at that point, a cProfile (cumulative CPU time
per function of ``napari_dismm.model``) and torch's profiler table (self time per operator,
backward included), to find what grows faster than N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

N_PATIENTS = 8
KINDS = ("teacher", "student")


# -- the cohort -------------------------------------------------------------------------------------------------


def write_cohort(root: Path, n: int, dim: int) -> Path:
    """Eight slides of exactly ``n`` 20x patches (and n / 4 at 10x), written once per size."""
    import dataclasses

    from training.synth import planted_cohort_config, write_synthetic_cohort

    out = root / f"n{n}_d{dim}"
    if not (out / "cohort.csv").exists():
        cfg = dataclasses.replace(planted_cohort_config(n_patients=N_PATIENTS, patches_20x=n, feature_dim=dim,
                                                        scanner_mix=0.5), size_spread=0.0)
        start = time.perf_counter()
        write_synthetic_cohort(out, config=cfg, n_tumor_genes=16, n_tme_genes=16, with_truth=False,
                               keep_features=False)
        print(f"# wrote {N_PATIENTS} slides x {n} patches x {dim} features in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
    return out


# -- one point, in its own process --------------------------------------------------------------------------------


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _accepted(cls, **kwargs) -> dict:
    """The keyword arguments ``cls`` takes (and that are set): the objective's signature moves
    with issue 14's geometry work, and the benchmark should keep running across it."""
    import inspect

    params = inspect.signature(cls).parameters
    return {k: v for k, v in kwargs.items() if k in params and v is not None}


def _build(kind: str, cohort_dir: Path, batch_size: int):
    """(model, objective, batch) with the shipped defaults, on whole bags."""
    import torch

    from napari_dismm.model.registry import build_model
    from training.cohort import load_cohort
    from training.config import config_from_dict
    from training.dataset import collate_bags
    from training.splits import Fold
    from training.stages.supervised import SupervisedObjective, model_config, prepare_fold
    from training.stages.distillation import DistillationObjective

    cohort = load_cohort(cohort_csv=cohort_dir / "cohort.csv", expression=cohort_dir / "expression.tsv",
                         gene_sets=cohort_dir / "sets.gmt", task="classification")
    cfg = config_from_dict({"data": {"max_patches": 10**9}})
    fold = Fold(train=tuple(cohort.patients[:batch_size]), val=(), test=())
    setup = prepare_fold(cohort, fold, 0, cfg, use_genes=True)
    batch = collate_bags([setup.data.train[i] for i in range(batch_size)])
    torch.manual_seed(0)
    teacher = build_model(model_config("teacher", setup))
    t = cfg.teacher
    if kind == "teacher":
        objective = SupervisedObjective(teacher, **_accepted(
            SupervisedObjective, task=setup.task, class_weights=setup.class_weights, dev_weight=t.dev_weight,
            cgc=t.cgc, patch_size_10x_level0=getattr(setup, "patch_size_10x_level0", None),
            dev_scale=getattr(teacher.config, "dev_scale", 1e4), dev_form=t.dev_form, dev_warmup=0,
            slide_aux_weight=t.slide_aux_weight))
        return teacher, objective, batch, cfg.teacher
    student = build_model(model_config("student", setup))
    for mag in student.config.magnifications:  # fixed prototypes: their values do not change the cost
        student.set_subspace_prototypes(torch.randn(student.config.d), torch.randn(student.config.d), magnification=mag)
    s = cfg.student
    objective = DistillationObjective(teacher, task=setup.task, class_weights=setup.class_weights,
                                      temperature=s.temperature, lambda_kd=s.lambda_kd, lambda_f=s.lambda_f,
                                      lambda_att=s.lambda_att)
    return student, objective, batch, s


def run_point(kind: str, cohort_dir: Path, batch_size: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model, objective, batch, section = _build(kind, cohort_dir, batch_size)
    model.to(device).train()
    if kind == "student":
        objective.teacher.to(device)
    batch = batch.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=section.lr, weight_decay=section.weight_decay)
    input_bytes = sum(v.numel() * v.element_size() for v in batch.bags.values())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = objective.train_loss(model, batch)
        loss.backward()
        objective.after_backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset = _reset_peak()
        base = _rss_kb("VmRSS") * 1024 if reset else _rss_kb("VmHWM") * 1024
    step()  # warm-up: allocates the optimiser state, fills caches
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    cpu_seconds = (time.process_time() - cpu_start) / steps
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kb("VmHWM") * 1024
    return {"kind": kind, "n": int(batch.bags["20x"].shape[1]), "n10": int(batch.bags["10x"].shape[1]),
            "batch": batch_size, "seconds": seconds, "cpu_seconds": cpu_seconds, "step_mb": max(peak - base, 0) / 2**20,
            "input_mb": input_bytes / 2**20, "device": device.type}


def profile_point(kind: str, cohort_dir: Path, batch_size: int, threads: int, top: int = 25) -> None:
    import cProfile
    import pstats

    import torch

    torch.set_num_threads(threads)
    model, objective, batch, section = _build(kind, cohort_dir, batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=section.lr)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = objective.train_loss(model, batch)
        loss.backward()
        optimizer.step()

    step()
    profiler = cProfile.Profile(time.process_time)  # CPU time: robust to the machine's load
    profiler.enable()
    step()
    profiler.disable()
    stats = pstats.Stats(profiler).sort_stats("cumulative")
    stats.print_stats(r"napari_dismm/model|training/|backward|optim", top)
    # the backward pass is one C++ call to cProfile: torch's profiler splits it by operator (wall time)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


# -- the table ----------------------------------------------------------------------------------------------------


def _slope(rows: list[dict], key: str, lo: int, hi: int) -> float:
    a, b = rows[lo], rows[hi]
    if a[key] <= 0 or b[key] <= 0:
        return float("nan")
    return math.log(b[key] / a[key]) / math.log(b["n"] / a["n"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 50_000], help="20x patches per bag")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--dim", type=int, default=1024, help="patch feature width")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per point (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--root", type=Path, default=None, help="where the cohorts go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--profile", nargs=3, metavar=("KIND", "N", "B"), default=None)
    parser.add_argument("--point", nargs=4, metavar=("KIND", "DIR", "B", "STEPS"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        kind, cohort_dir, b, steps = args.point
        print(json.dumps(run_point(kind, Path(cohort_dir), int(b), int(steps), args.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        if args.profile:
            kind, n, b = args.profile
            profile_point(kind, write_cohort(root, int(n), args.dim), int(b), args.threads)
            return
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}
        rows = []
        for n in sorted(args.sizes):
            cohort_dir = write_cohort(root, n, args.dim)
            for kind in args.kinds:
                for b in args.batches:
                    cmd = [sys.executable, __file__, "--threads", str(args.threads),
                           "--point", kind, str(cohort_dir), str(b), str(args.steps)]
                    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    if done.returncode:
                        print(f"# {kind} N={n} B={b} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                        continue
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                    rows.append(row)
                    print(f"# {kind:8s} N={row['n']:>6d} B={b}: {row['seconds']:7.2f} s/step "
                          f"({row['cpu_seconds']:7.2f} s CPU)  "
                          f"step {row['step_mb']:8.0f} MB  input {row['input_mb']:7.0f} MB", file=sys.stderr)
    # on CPU the slopes use CPU time: with one thread it is the work done, whatever else loads the machine
    clock = "cpu_seconds" if all(r["device"] == "cpu" for r in rows) else "seconds"
    print(f"step cost per point: {clock.replace('_', ' ')} (wall seconds) and step memory; "
          f"slopes: log-log, first to last size and last two sizes")
    print(f"{'model':8s} {'B':>2s} " + " ".join(f"{'N=' + str(n):>26s}" for n in sorted(args.sizes))
          + "   time slope    memory slope")
    for kind in args.kinds:
        for b in args.batches:
            mine = sorted((r for r in rows if r["kind"] == kind and r["batch"] == b), key=lambda r: r["n"])
            if len(mine) < 2:
                continue
            cells = " ".join(f"{r[clock]:7.2f} ({r['seconds']:6.2f}) s {r['step_mb']:6.0f} MB" for r in mine)
            print(f"{kind:8s} {b:>2d} {cells}   {_slope(mine, clock, 0, -1):4.2f}, {_slope(mine, clock, -2, -1):4.2f}"
                  f"   {_slope(mine, 'step_mb', 0, -1):4.2f}, {_slope(mine, 'step_mb', -2, -1):4.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
