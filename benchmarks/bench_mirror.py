"""MIRROR pretraining step cost vs. bag size: time, peak memory, growth exponents.

    python benchmarks/bench_mirror.py [--sizes 2048 20000] [--repeats 3] [--threads 1]

Each bag size runs in a fresh subprocess (so peak memory is that run's own). One step =
``Mirror.pretrain_losses`` (slide encoder with [CLS], linear-cost attention and the
positional convolution on the real lattice, masked-token retention decoder, RNA encoder
and decoder, CLIP alignment, style clustering with its Sinkhorn balance labels) +
backward + AdamW step, with the default MirrorConfig (d_in 1024, d 128, 2000 genes, 3000
prototypes), B = 2 slides (CLIP needs a pair) of N tokens each at one magnification,
lattice coordinates. Time = best wall time of ``--repeats`` steps after one warm-up step (process CPU time beside it). Peak memory
= peak RSS during a step minus the RSS just before it, polled every 2 ms.

The growth exponent is fitted on log-log over the sizes (goal: about 1, i.e. linear;
dense N x N attention would be 2), and the ratio t(N_max)/t(N_min) is printed against
the linear ratio N_max/N_min, both measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_student import PeakRSS, fit_exponent, lattice  # noqa: E402  (the shared benchmark helpers)


def worker(n: int, repeats: int, threads: int) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from napari_dismm.model.mirror import Mirror, MirrorConfig

    torch.manual_seed(0)
    config = MirrorConfig(magnifications=("20x",))
    model = Mirror(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bags = {"20x": torch.randn(2, n, config.d_in)}
    coords = {"20x": torch.stack([lattice(n), lattice(n)]).long()}
    genes = torch.randn(2, config.n_genes)

    def step() -> float:
        loss, _ = model.pretrain_losses(bags, genes=genes, coords=coords)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    step()  # warm-up: kernels, optimizer state
    walls, cpus = [], []
    with PeakRSS() as mem:
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step()
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    if loss != loss:
        raise RuntimeError("non-finite loss")
    return {"n": n, "wall_s": min(walls), "cpu_s": min(cpus), "peak_mb": (mem.peak - mem.start) / 2**20,
            "threads": torch.get_num_threads()}


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 20_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.repeats, args.threads)))
        return
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(wall times on a shared machine are inflated; cpu s is steadier)")
    rows = [run_child(["--worker", str(n), "--repeats", str(args.repeats), "--threads", str(args.threads)])
            for n in args.sizes]
    print("\nMIRROR pretraining step (forward + backward + AdamW), B = 2 slides of N tokens, default config")
    print(f"{'N':>8} {'wall s':>8} {'cpu s':>8} {'peak MB':>9} {'us/token':>9}")
    for r in rows:
        print(f"{r['n']:>8} {r['wall_s']:>8.3f} {r['cpu_s']:>8.3f} {r['peak_mb']:>9.0f} {1e6 * r['wall_s'] / (2 * r['n']):>9.1f}")
    ns = [r["n"] for r in rows]
    if len(ns) >= 2:
        print(f"threads: {rows[0]['threads']}")
        print(f"growth exponent (log-log): wall {fit_exponent(ns, [r['wall_s'] for r in rows]):.3f}, "
              f"cpu {fit_exponent(ns, [r['cpu_s'] for r in rows]):.3f}, "
              f"memory {fit_exponent(ns, [max(r['peak_mb'], 1.0) for r in rows]):.3f}  (linear = 1, dense attention = 2)")
        print(f"ratio {ns[-1]}/{ns[0]} tokens: wall {rows[-1]['wall_s'] / rows[0]['wall_s']:.1f}, "
              f"cpu {rows[-1]['cpu_s'] / rows[0]['cpu_s']:.1f}, memory {rows[-1]['peak_mb'] / max(rows[0]['peak_mb'], 1.0):.1f}"
              f"  vs linear {ns[-1] / ns[0]:.1f}")


if __name__ == "__main__":
    main()
