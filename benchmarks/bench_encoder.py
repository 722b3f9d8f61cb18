"""Patch-encoder throughput per recipe on this machine's CPU, measured side by side in one run.

    python benchmarks/bench_encoder.py [--batch 32] [--repeats 2] [--names a b ...]
                                       [--giant-depth 2 | --full]

For each recipe: patches/s at batch ``--batch`` (uint8 224 px patches -> features, the
whole `Encoder.encode` path, random weights: the architecture, not the values, sets the
cost), the FLOPs of one patch (counted by torch's FlopCounterMode on the same network),
and the encoder's achieved FLOP/s as a fraction of this machine's dense matmul FLOP/s
(a 2048 x 2048 fp32 product, measured again right before each encoder, so that both see
the same load on a shared machine).

The giants (ViT-g/14, ViT-H/14 and the ViT-Ls: 0.3-1.1 B parameters) run at a reduced
depth by default (``--giant-depth`` blocks, same widths): patches/s is then that of the
reduced network; the fraction of matmul speed (what the architecture achieves per FLOP)
is dominated by the blocks and so approximates the full model's. ``--full`` builds them whole (minutes, GBs).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from napari_dismm.features.encoders import RECIPES, encoder_from_recipe, get_recipe, list_encoders

DEFAULT_NAMES = list_encoders()
SMALL = {"efficientnet-lite0", "resnet50-trunc", "phikon", "kaiko-vitb16", "hibou-b"}


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Dense fp32 matrix-multiply FLOP/s of this machine (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    return 2 * n**3 / _best_of(lambda: a @ b, repeats)


def flops_per_patch(model: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--names", nargs="+", default=DEFAULT_NAMES, choices=sorted(RECIPES))
    parser.add_argument("--giant-depth", type=int, default=2, help="blocks kept for the large recipes")
    parser.add_argument("--full", action="store_true", help="build every recipe at full depth")
    args = parser.parse_args()

    patches = np.random.default_rng(0).integers(0, 256, (args.batch, 224, 224, 3), dtype=np.uint8)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, best of {args.repeats}")
    print(f"{'encoder':<20}{'depth':>7}{'dim':>6}{'GFLOP/patch':>13}{'patches/s':>11}{'matmul GFLOP/s':>16}"
          f"{'x matmul':>10}")
    for name in args.names:
        recipe = get_recipe(name)
        reduced = not args.full and name not in SMALL
        if reduced:
            recipe = recipe.reduced(depth=args.giant_depth)
        enc = encoder_from_recipe(recipe, allow_random=True)
        flops = flops_per_patch(enc.model, recipe.input_size)
        enc.encode(patches[:2])  # warm-up
        peak = matmul_flops()
        seconds = _best_of(lambda: enc.encode(patches), args.repeats)
        rate = args.batch / seconds
        blocks = len(enc.model.trunk.blocks) if recipe.output != "pool" else "-"
        depth = f"{blocks}*" if reduced else str(blocks)
        print(f"{name:<20}{depth:>7}{recipe.dim:>6}{flops / 1e9:>13.2f}{rate:>11.1f}{peak / 1e9:>16.1f}"
              f"{flops * rate / peak:>10.2f}")
    if not args.full:
        print("* reduced depth (same widths): patches/s of the reduced network; "
              "the matmul fraction approximates the full one")


if __name__ == "__main__":
    main()
