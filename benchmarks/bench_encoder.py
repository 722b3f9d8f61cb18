"""Patch-encoder throughput on this machine, measured side by side in one run.

    python benchmarks/bench_encoder.py [--batch 32] [--repeats 3] [--with-vit-large]

Prints patches/s for each encoder (random weights for those needing a user file: the
architecture, not the values, sets the cost) and the ratio of each to the default
encoder, plus the share of time spent in preprocessing (uint8 -> normalised tensor,
including a 256 -> 224 resize) versus the forward pass.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from napari_dismm.features.encoders import DEFAULT_ENCODER, get_encoder


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--with-vit-large", action="store_true", help="also time ViT-L/16 (slow on CPU)")
    args = parser.parse_args()

    names = [DEFAULT_ENCODER, "resnet50-trunc", "vit-base-16"]
    if args.with_vit_large:
        names.append("vit-large-16")
    rng = np.random.default_rng(0)
    at_224 = rng.integers(0, 256, (args.batch, 224, 224, 3), dtype=np.uint8)
    at_256 = rng.integers(0, 256, (args.batch, 256, 256, 3), dtype=np.uint8)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, best of {args.repeats}")
    print(f"{'encoder':<20}{'dim':>6}{'patches/s':>12}{'x default':>11}{'preproc 256->224 %':>20}")
    rates: dict[str, float] = {}
    for name in names:
        enc = get_encoder(name, allow_random=True)
        enc.encode(at_224[:2])  # warm-up
        total = _best_of(lambda: enc.encode(at_224), args.repeats)
        prep = _best_of(lambda: enc.preprocess(at_256), args.repeats)
        resized_total = _best_of(lambda: enc.encode(at_256), 1)
        rates[name] = args.batch / total
        ratio = rates[name] / rates[DEFAULT_ENCODER]
        print(f"{name:<20}{enc.dim:>6}{rates[name]:>12.1f}{ratio:>11.2f}{100 * prep / resized_total:>19.1f}%")


if __name__ == "__main__":
    main()
