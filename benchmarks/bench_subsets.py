"""Training-time subsets of a large bag: what geometry they keep, and what they cost.

    python benchmarks/bench_subsets.py [--radii 40 80] [--cap 4096] [--epochs 5]

A disc-shaped slide of 10x patches (radius in 10x cells, footprint 448) with their four 20x
children each. Per subset rule, side by side in one run, mean over ``--epochs`` draws:
the share of kept 20x patches whose 10x parent is kept, patches per 3 x 3 lattice block
(itself included) at 20x and 10x against the whole bag, the Pearson correlation of two
*consistent* maps (a smooth field at 20x and its sum over each 10x parent) as DEV sees
them on the subset, and the time of one draw. Rules: ``blocks`` (``geometric_subset``,
the default since issue 14) and ``random`` (independent random rows per magnification,
as before). Prints the ratio of the two rules' figures.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from napari_dismm.model.context import neighbour_counts
from napari_dismm.model.grid import grid_index_20x_to_10x, pool_onto_10x
from napari_dismm.model.losses import _pearson
from training.dataset import geometric_subset

FP10 = 448


def disc(radius: int) -> dict[str, np.ndarray]:
    ij = np.stack(np.meshgrid(np.arange(2 * radius), np.arange(2 * radius)), -1).reshape(-1, 2)
    ij = ij[((ij + 0.5 - radius) ** 2).sum(1) <= radius**2]
    c10 = ij * FP10
    quarters = np.array([[0, 0], [1, 0], [0, 1], [1, 1]]) * (FP10 // 2)
    return {"10x": c10.astype(np.int64), "20x": (c10[:, None] + quarters[None]).reshape(-1, 2).astype(np.int64)}


def figures(c10: np.ndarray, c20: np.ndarray) -> dict[str, float]:
    t10, t20 = torch.from_numpy(c10)[None], torch.from_numpy(c20)[None]
    index = grid_index_20x_to_10x(t10, t20, None, None, patch_size_10x_level0=float(FP10))
    field = torch.from_numpy(np.exp(np.sin(c20[:, 0] / 3000.0) + np.cos(c20[:, 1] / 2000.0)))[None]
    # the consistent 10x map: the field summed over *all* the parent's children (whole bag)
    whole20 = (c10[:, None] + np.array([[0, 0], [1, 0], [0, 1], [1, 1]]) * (FP10 // 2)).reshape(-1, 2)
    a10 = torch.from_numpy(np.exp(np.sin(whole20[:, 0] / 3000.0) + np.cos(whole20[:, 1] / 2000.0))
                           .reshape(-1, 4).sum(1))[None]
    r = float(_pearson(a10, pool_onto_10x(field, index, len(c10)), None)[0])
    return {
        "parents": float((index >= 0).float().mean()),
        "nb20": float(neighbour_counts(t20, None, step=FP10 / 2).float().mean()),
        "nb10": float(neighbour_counts(t10, None, step=float(FP10)).float().mean()),
        "r": r,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--radii", type=int, nargs="+", default=[40, 80])
    parser.add_argument("--cap", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    fps = {"10x": float(FP10), "20x": FP10 / 2}
    for radius in args.radii:
        slide = disc(radius)
        whole = figures(slide["10x"], slide["20x"])
        print(f"slide: {len(slide['20x'])} 20x / {len(slide['10x'])} 10x patches; whole bag: "
              f"{whole['nb20']:.2f} / {whole['nb10']:.2f} patches per 3 x 3 block, r = {whole['r']:.3f}")
        rows = {}
        for rule in ("blocks", "random"):
            got, seconds = [], []
            for epoch in range(args.epochs):
                rng = np.random.default_rng([0, epoch, radius])
                t0 = time.perf_counter()
                if rule == "blocks":
                    keep = geometric_subset(slide, fps, max_patches=args.cap, rng=rng)
                else:
                    keep = {m: np.sort(rng.choice(len(c), min(args.cap, len(c)), replace=False))
                            for m, c in slide.items()}
                seconds.append(time.perf_counter() - t0)
                got.append(figures(slide["10x"][keep["10x"]], slide["20x"][keep["20x"]]))
            rows[rule] = {k: float(np.mean([g[k] for g in got])) for k in got[0]}
            rows[rule]["ms"] = 1e3 * float(np.median(seconds))
            f = rows[rule]
            print(f"  {rule:6s}: parents kept {100 * f['parents']:5.1f} %, per block {f['nb20']:.2f} (20x) / "
                  f"{f['nb10']:.2f} (10x), consistent maps r = {f['r']:.3f}, {f['ms']:.1f} ms per draw")
        b, r = rows["blocks"], rows["random"]
        print(f"  blocks / random: neighbours 20x x{b['nb20'] / r['nb20']:.2f}, 10x x{b['nb10'] / r['nb10']:.2f}, "
              f"parents x{b['parents'] / r['parents']:.2f}, time x{b['ms'] / r['ms']:.1f}")


if __name__ == "__main__":
    main()
