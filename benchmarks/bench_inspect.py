"""Inspect costs, each as a ratio measured in one run (interleaved, medians):

1. linear CKA in feature space (our ``linear_cka``: p x q cross-covariance) against the
   textbook Gram-matrix form (n x n kernels) on a cohort-sized feature set;
2. a gallery of lazy patch thumbnails (``read_patch``: only each patch's region of the
   level for the model's magnification) against materialising that pyramid level once:
   time and pixels held. On the small generated slide decoding the whole level is faster
   (each patch re-decodes its tiles); what laziness buys is memory, which grows with the slide.

Run: python benchmarks/bench_inspect.py [--n 4000] [--d 128]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from napari_dismm.inspect.cka import linear_cka


def cka_gram(x: np.ndarray, y: np.ndarray) -> float:
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float(np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l)))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="slides (CKA samples)")
    parser.add_argument("--d", type=int, default=128, help="feature width")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(args.n, args.d)), rng.normal(size=(args.n, args.d))
    ours, gram = [], []
    for _ in range(args.repeats):
        ours.append(timed(lambda: linear_cka(x, y)))
        gram.append(timed(lambda: cka_gram(x, y)))
    assert abs(linear_cka(x, y) - cka_gram(x, y)) < 1e-8
    a, b = statistics.median(ours), statistics.median(gram)
    print(f"CKA n={args.n} d={args.d}: feature space {a * 1e3:.1f} ms, Gram form {b * 1e3:.1f} ms, ratio {a / b:.3f}")

    from napari_dismm.slide import open_slide, write_sample_slide
    from napari_dismm.viewer.inspect.layers import gallery_indices, read_patch

    with tempfile.TemporaryDirectory() as tmp:
        path = write_sample_slide(Path(tmp) / "s.tif", width=6000, height=5000, mpp=0.25, seed=1).path
        with open_slide(path) as slide:
            levels = list(slide.pyramid)
            size = 448  # 20x patch at 0.25 µm/px
            cols, rows = 6000 // size, 5000 // size
            patches = pd.DataFrame({"x": [(i % cols) * size for i in range(cols * rows)],
                                    "y": [(i // cols) * size for i in range(cols * rows)],
                                    "width": size, "height": size})
            picks = np.concatenate(list(gallery_indices(rng.random(len(patches)), k=8).values()))
            lazy, whole = [], []
            for _ in range(args.repeats):
                lazy.append(timed(lambda: [read_patch(levels, patches.iloc[i], slide_mpp=0.25, mag="20x") for i in picks]))
                whole.append(timed(lambda: np.asarray(levels[1])))
            a, b = statistics.median(lazy), statistics.median(whole)
            print(f"gallery of {len(picks)} thumbnails: lazy {a * 1e3:.1f} ms, whole 20x level {b * 1e3:.1f} ms, "
                  f"ratio {a / b:.3f}")
            patch_bytes = len(picks) * size // 2 * size // 2 * 3
            level_bytes = int(np.prod(levels[1].shape))
            print(f"pixels held: lazy {patch_bytes / 2**20:.1f} MiB, whole level {level_bytes / 2**20:.1f} MiB, "
                  f"ratio {patch_bytes / level_bytes:.4f} (a 100k x 80k slide's 20x level is ~5.6 GiB)")


if __name__ == "__main__":
    main()
