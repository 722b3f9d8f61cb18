"""What the student's map-pooled probe costs (``[student] probe_pooling = "teacher_maps"``).

    python benchmarks/bench_map_probe.py [--sizes 10000 50000 100000] [--dim 1024] [--slides 40]

Inference, each bag size in a fresh subprocess: one slide of N 20x patches and N / 4 10x
patches (random features, lattice coordinates), a student with the default config in eval
mode under no_grad. Side by side in that process: the probe's input as before (the mean patch
features, ``probe_pooling = "mean"``) and with the map scores (neighbourhood-mixed scores and
the adjoint pooling, model/probes.py ``MapScorers``), and the whole student forward with the
map probe. Time: best wall time of ``--repeats`` calls; peak memory: the rise of RSS during
the call (polled every 2 ms), for the map pooling and for the whole forward.

Fitting (training/map_scorers.py), in the main process: one subspace's score by L-BFGS for
the whole penalty grid on ``--slides`` training slides of 2048 sampled patches of ``--dim``
features (a planted score direction), the validation KL on a quarter as many slides; the
fit runs 2 subspaces x 2 magnifications of these per fold.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import timeit
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))


def best_time(fn, repeats: int) -> float:
    return min(timeit.repeat(fn, number=1, repeat=repeats))


def peak_rise(fn) -> float:
    """MB the resident set rose by during one call of ``fn``."""
    import psutil

    from bench_student import PeakRSS

    base = psutil.Process().memory_info().rss
    with PeakRSS() as peak:
        fn()
    return (peak.peak - base) / 2**20


def worker(n: int, dim: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from bench_student import lattice
    from napari_dismm.model.student import Student, StudentConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Student(StudentConfig(d_in=dim, n_outputs=2, probes=True, probe_pooling="teacher_maps")).eval()
    rng = np.random.default_rng(0)
    model.map_scorers.set_fit(mean=rng.normal(size=(2, dim)), scale=rng.uniform(0.5, 2, size=(2, dim)),
                              weight=rng.normal(size=(2, 2, dim)) / dim ** 0.5)
    sizes = {"10x": n // 4, "20x": n}
    bags = {m: torch.randn(1, k, dim) for m, k in sizes.items()}
    coords = {m: torch.as_tensor(lattice(k, 448.0 if m == "10x" else 224.0))[None] for m, k in sizes.items()}
    footprints = {m: torch.tensor([448.0 if m == "10x" else 224.0], dtype=torch.float64) for m in sizes}
    mags, fill = model.config.magnifications, model.slide_probe.mean
    width = dim * len(mags)
    from napari_dismm.model.probes import pooled_magnifications

    with torch.no_grad():
        def mean_only():
            return pooled_magnifications(bags, None, mags, fill[:width])

        def maps():
            return model.map_scorers(bags, None, mags, fill[width:], coords=coords,
                                     steps=model.footprint_steps(bags, footprints))

        def forward():
            return model(bags, coords=coords, footprints=footprints)

        forward()  # warm-up
        row = {"n": n, "mean_s": best_time(mean_only, repeats), "maps_s": best_time(maps, repeats),
               "forward_s": best_time(forward, repeats), "maps_mb": peak_rise(maps), "forward_mb": peak_rise(forward),
               "input_mb": sum(b.numel() for b in bags.values()) * 4 / 2**20}
    return row


def fit_cost(slides: int, dim: int) -> dict:
    import torch

    from training.map_scorers import MAP_FIT_PATCHES, MAP_PENALTIES, fit_score

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    v_true = torch.randn(dim, generator=g) / dim ** 0.5

    def make(count):
        out = []
        for _ in range(count):
            z = torch.randn(MAP_FIT_PATCHES, dim, generator=g)
            t = torch.softmax(z @ v_true, dim=0)
            out.append((z, torch.stack([t, t], dim=1)))
        return out

    train, val = make(slides), make(max(1, slides // 4))
    start = time.process_time()
    v, chosen = fit_score(train, val, column=0)
    cpu = time.process_time() - start
    cosine = float(v @ v_true / (v.norm() * v_true.norm()))
    return {"slides": slides, "dim": dim, "penalties": len(MAP_PENALTIES), "cpu_s": cpu, "chosen": chosen["penalty"],
            "cosine_to_planted": cosine}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--slides", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dim, args.repeats)))
        return
    print("inference, one slide (20x N, 10x N/4), one torch thread")
    print(f"{'N':>8} {'mean s':>8} {'maps s':>8} {'maps/mean':>9} {'forward s':>9} {'maps/forward':>12} "
          f"{'maps MB':>8} {'forward MB':>10} {'input MB':>8}")
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--worker", str(n), "--dim", str(args.dim),
                              "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{n:>8} {r['mean_s']:>8.3f} {r['maps_s']:>8.3f} {r['maps_s'] / r['mean_s']:>9.1f} "
              f"{r['forward_s']:>9.3f} {r['maps_s'] / r['forward_s']:>12.2f} {r['maps_mb']:>8.0f} "
              f"{r['forward_mb']:>10.0f} {r['input_mb']:>8.0f}")
    r = fit_cost(args.slides, args.dim)
    print(f"fit: one subspace and magnification, {r['slides']} slides x 2048 patches x {r['dim']}, "
          f"{r['penalties']} penalties: {r['cpu_s']:.1f} CPU s (x4 per fold); chosen penalty {r['chosen']}, "
          f"cosine to the planted direction {r['cosine_to_planted']:.3f}")


if __name__ == "__main__":
    main()
