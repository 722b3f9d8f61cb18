"""ITA cost and behaviour vs bag size: the former centre rule and the new one side by side.

    OMP_NUM_THREADS=1 python benchmarks/bench_ita.py [--sizes 1000 10000 50000 100000] [--repeats 3]

Tokens: d = 128 (the student's width), two tissue modes of 45 % and 35 % of the bag (means
24 apart along a random direction, spread 1 and 1.1 per dimension) and 20 % diffuse
background, the data of tests/model/test_ita_scale.py. Per rule and bag size, in a fresh
subprocess (so the peak memory is that run's own): ``InformativeTokenAggregation.aggregate``
under no_grad (soft merging, K = 2; rows in key order with their keys given, as the
student calls it), best wall time of ``--repeats`` runs, peak RSS during
the first run minus the RSS just before it (polled every 2 ms by a thread), and whether
the two centres sit in the two modes.

- old: ``candidates="densest"``, 1024 anchors, 1024 candidates, memberships in units of
  the spread at temperature 2 (students saved before format 4);
- new: ``candidates="anchors"``, 2048 anchors, memberships as before (the defaults; the
  membership unit was measured separately, below and in the README).

Printed: the table, the growth exponent of time and of peak memory vs N (log-log fit over
all sizes and over N >= 10k; 1 = linear), and the ratio old / new time per size. Then the membership
measurement (in this process): planted two-mode tokens (n = 2000, d = 64, two equal
unit-variance modes ``separation`` standard deviations apart), mean membership of each
token in its own cluster, for the former unit at temperature 2 and the width unit at
temperatures 0.5 / 1 / 2 (hard assignment = 1.000), with the share of tokens whose cluster
is their mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from bench_student import PeakRSS  # noqa: E402  (the shared benchmark helpers)
from tests.model.model_helpers import tissue_modes  # noqa: E402  (the modes the ITA tests plant)

RULES = {
    "old": {"candidates": "densest", "n_anchors": 1024, "n_candidates": 1024, "membership_scale": "spread",
            "temperature": 2.0},
    "new": {"candidates": "anchors", "n_anchors": 2048, "membership_scale": "spread", "temperature": 2.0},
}


def one_run(rule: str, n: int, repeats: int) -> dict:
    """Child process: time and peak memory of one rule at one bag size."""
    import torch

    from napari_dismm.model.ita import InformativeTokenAggregation, default_prototypes, permutation_keys

    torch.manual_seed(0)
    x, labels = tissue_modes(n)
    # as the student calls it: rows already in key order, keys from 16 feature columns
    keys = permutation_keys(features=x[:, :16])
    order = torch.sort(keys, stable=True).indices
    x, labels, keys = x[order], labels[order], keys[order]
    module = InformativeTokenAggregation(x.shape[1], k=2, **RULES[rule])
    protos = default_prototypes(x.shape[1])
    times = []
    with torch.no_grad():
        with PeakRSS() as rss:
            start = time.perf_counter()
            bag = module.aggregate(x, prototypes=protos, keys=keys)
            times.append(time.perf_counter() - start)
        for _ in range(repeats - 1):
            start = time.perf_counter()
            module.aggregate(x, prototypes=protos, keys=keys)
            times.append(time.perf_counter() - start)
    found = sorted(labels[bag.is_centre].tolist()) == [0, 1]
    return {"rule": rule, "n": n, "seconds": min(times), "peak_mb": (rss.peak - rss.start) / 2**20, "both_modes": found}


def slope(ns, values) -> float:
    return float(np.polyfit(np.log(ns), np.log(np.maximum(values, 1e-9)), 1)[0])


def membership_table() -> None:
    import torch

    from napari_dismm.model.ita import assign_to_centres, dpc_knn_centres, soft_membership

    settings = (("spread", 2.0), ("width", 0.5), ("width", 1.0), ("width", 2.0))
    print("\nown-cluster membership vs separation (planted two-mode tokens, n = 2000, d = 64; hard = 1.000)")
    print("separation (sd) | " + " | ".join(f"{s} t={t:g}" for s, t in settings) + " | cluster = mode")
    for separation in (1, 2, 4, 6, 8, 16):
        gen = torch.Generator().manual_seed(0)
        direction = torch.randn(64, generator=gen)
        direction = direction / direction.norm()
        labels = torch.arange(2000) % 2
        x = torch.randn(2000, 64, generator=gen) + (labels[:, None].float() - 0.5) * separation * direction
        centres = dpc_knn_centres(x, k=2)
        cluster = assign_to_centres(x, centres)
        own = [float(soft_membership(x, centres, temperature=t, scale=s).gather(1, cluster[:, None]).mean())
               for s, t in settings]
        agree = float(max((cluster == labels).float().mean(), (cluster != labels).float().mean()))
        print(f"{separation:15d} | " + " | ".join(f"{v:{len(f'{s} t={t:g}')}.3f}" for v, (s, t) in zip(own, settings))
              + f" | {agree:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000, 100000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("RULE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args.child[0], int(args.child[1]), args.repeats)))
        return
    rows = []
    for n in args.sizes:
        for rule in RULES:
            out = subprocess.run([sys.executable, __file__, "--child", rule, str(n), "--repeats", str(args.repeats)],
                                 capture_output=True, text=True, check=True, env=os.environ.copy())
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['rule']:>3} N={r['n']:>7}: {r['seconds']:.3f} s, peak +{r['peak_mb']:.1f} MB, "
                  f"both modes found: {r['both_modes']}", flush=True)
    print(f"\nthreads: {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print("rule |      N | seconds | peak MB | both modes")
    for r in rows:
        print(f"{r['rule']:>4} | {r['n']:>6} | {r['seconds']:7.3f} | {r['peak_mb']:7.1f} | {r['both_modes']}")
    for rule in RULES:
        mine = [r for r in rows if r["rule"] == rule]
        ns = [r["n"] for r in mine]
        print(f"{rule}: time exponent {slope(ns, [r['seconds'] for r in mine]):.2f}, "
              f"peak-memory exponent {slope(ns, [r['peak_mb'] for r in mine]):.2f} over N = {ns[0]}..{ns[-1]}")
        upper = [r for r in mine if r["n"] >= 10000]
        if len(upper) >= 2 and len(upper) < len(mine):
            nu = [r["n"] for r in upper]
            print(f"{rule}: time exponent {slope(nu, [r['seconds'] for r in upper]):.2f}, "
                  f"peak-memory exponent {slope(nu, [r['peak_mb'] for r in upper]):.2f} over N = {nu[0]}..{nu[-1]}")
    for n in args.sizes:
        old, new = (next(r for r in rows if r["rule"] == rule and r["n"] == n) for rule in RULES)
        print(f"N={n}: old / new time {old['seconds'] / new['seconds']:.2f}, peak memory "
              f"{old['peak_mb']:.1f} / {new['peak_mb']:.1f} MB")
    membership_table()


if __name__ == "__main__":
    main()
