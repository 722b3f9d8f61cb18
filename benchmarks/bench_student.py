"""Student inference cost vs. bag size: time, peak memory, fitted time exponent.

    python benchmarks/bench_student.py [--sizes 10000 50000 100000 200000] [--both]

Each bag size runs in a fresh subprocess (so peak memory is that run's own): a student
with the default config (d_in=1024, d=128, K=2) in eval mode under no_grad, one bag of
N random 1024-d features with lattice coordinates. Default: ONE magnification (20x,
N tokens); ``--both`` adds rows with both magnifications (20x: N tokens, 10x: N/4,
the real ratio of patch counts). "x embed" = student time / time of the patch
embedding Linear(1024 -> 128) alone on the same bags, measured in the same process: a
load-independent measure of what the student adds on top of that unavoidable GEMM.
Time = best wall time of ``--repeats`` forwards (process CPU time printed beside it:
other jobs on a shared machine inflate wall time more than CPU time). Peak memory =
peak RSS during the first forward minus the RSS just before it (input tensors and model
already resident), polled every 2 ms by a thread.

Side by side in the same run: the reference-style ITA (one dense N x N distance matrix,
as in the published code) against ours on the same tokens at a small N, and the fitted
exponent of time vs N on log-log (goal <= 1.15), with the ratio t(N_max)/t(N_min)
against the linear ratio N_max/N_min.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np


class PeakRSS:
    """Poll this process's RSS in a thread; ``peak`` is the largest value seen."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def lattice(n: int, step: float = 448.0):
    import torch

    side = int(np.ceil(np.sqrt(n)))
    idx = torch.arange(n)
    return torch.stack([idx % side, idx // side], dim=1).double() * step


def worker(n: int, both: bool, repeats: int, threads: int) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    from napari_dismm.model.student import Student, StudentConfig

    torch.manual_seed(0)
    config = StudentConfig(magnifications=("10x", "20x"))
    model = Student(config).eval()
    sizes = {"20x": n, "10x": n // 4} if both else {"20x": n}
    bags = {m: torch.randn(1, k, config.d_in) for m, k in sizes.items()}
    coords = {m: lattice(k)[None] for m, k in sizes.items()}
    with torch.no_grad():  # warm up kernels on a small bag
        model({m: b[:, :2000] for m, b in bags.items()}, coords={m: c[:, :2000] for m, c in coords.items()})
        walls, cpus = [], []
        with PeakRSS() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(bags, coords=coords)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        for _ in range(repeats - 1):
            t0, c0 = time.perf_counter(), time.process_time()
            model(bags, coords=coords)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        embed_walls = []  # the floor any model pays: Linear(1024 -> 128) over the same bags
        for _ in range(repeats):
            t0 = time.perf_counter()
            for m, b in bags.items():
                model.branches[m].embed(b[0])
            embed_walls.append(time.perf_counter() - t0)
    assert torch.isfinite(out.logits).all()
    return {
        "n": n,
        "mags": "+".join(f"{m}:{k}" for m, k in sizes.items()),
        "wall_s": min(walls),
        "cpu_s": min(cpus),
        "peak_mb": (mem.peak - mem.start) / 2**20,
        "embed_s": min(embed_walls),
        "threads": torch.get_num_threads(),
    }


def dense_vs_ours(n: int) -> dict:
    """Reference-style ITA (dense cdist, N x N) vs ours, same tokens, same process."""
    import torch

    from napari_dismm.model.ita import dpc_knn_centres

    torch.manual_seed(0)
    x = torch.randn(n, 128)

    def dense() -> torch.Tensor:
        dist = torch.cdist(x, x) / 128**0.5  # the published N x N matrix
        nearest = dist.topk(5, dim=-1, largest=False).values
        density = (-(nearest**2).mean(-1)).exp()
        denser = density[None, :] > density[:, None]
        delta = torch.where(denser, dist, dist.max()).amin(dim=-1)
        return (density * delta).topk(2).indices

    result = {}
    for name, fn in (("dense", dense), ("ours", lambda: dpc_knn_centres(x, k=2))):
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            fn()
            result[name] = (time.perf_counter() - t0, (mem.peak - mem.start) / 2**20)
    return result


def fit_exponent(ns: list[int], ts: list[float]) -> float:
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000, 200_000])
    parser.add_argument("--both", action="store_true", help="also run both magnifications")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--dense-n", type=int, default=10_000)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-both", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-dense", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.worker_both, args.repeats, args.threads)))
        return
    if args.worker_dense is not None:
        print(json.dumps(dense_vs_ours(args.worker_dense)))
        return

    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(wall times on a shared machine are inflated; cpu s and 'x embed' are steadier)")
    modes = [False, True] if args.both else [False]
    for both in modes:
        common = ["--repeats", str(args.repeats), "--threads", str(args.threads)] + (["--worker-both"] if both else [])
        rows = [run_child(["--worker", str(n), *common]) for n in args.sizes]
        which = "both magnifications" if both else "one magnification (20x)"
        print(f"\nstudent inference, eval + no_grad, B = 1, {which}")
        print(f"{'N (20x)':>9} {'bags':>22} {'wall s':>8} {'cpu s':>8} {'peak MB':>9} {'us/token':>9} {'x embed':>8}")
        for r in rows:
            print(f"{r['n']:>9} {r['mags']:>22} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['peak_mb']:>9.0f} "
                  f"{1e6 * r['wall_s'] / r['n']:>9.1f} {r['wall_s'] / r['embed_s']:>8.1f}")
        ns = [r["n"] for r in rows]
        if len(ns) >= 2:
            print(f"threads: {rows[0]['threads']}")
            print(f"fitted exponent of time vs N (log-log): wall {fit_exponent(ns, [r['wall_s'] for r in rows]):.3f}, "
                  f"cpu {fit_exponent(ns, [r['cpu_s'] for r in rows]):.3f}  (goal <= 1.15)")
            print(f"ratio t({ns[-1]})/t({ns[0]}): wall {rows[-1]['wall_s'] / rows[0]['wall_s']:.1f}, "
                  f"cpu {rows[-1]['cpu_s'] / rows[0]['cpu_s']:.1f}  vs linear {ns[-1] / ns[0]:.1f}")

    if args.dense_n <= 0:  # the dense comparison is optional
        return
    dense = run_child(["--worker-dense", str(args.dense_n)])
    (t_d, m_d), (t_o, m_o) = dense["dense"], dense["ours"]
    print(f"\nDPC-kNN centre selection on {args.dense_n} tokens of 128-d, same run:")
    print(f"  dense N x N (published style): {t_d:.2f} s, peak +{m_d:.0f} MB")
    print(f"  ours (anchors + candidates):   {t_o:.2f} s, peak +{m_o:.0f} MB")
    print(f"  ratio dense/ours: time {t_d / max(t_o, 1e-9):.1f}x, memory {m_d / max(m_o, 1.0):.1f}x "
          f"(dense memory grows as N^2: {4 * 200_000**2 / 2**30:.0f} GiB for one float32 matrix at 200k)")


if __name__ == "__main__":
    main()
