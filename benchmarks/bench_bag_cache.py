"""Epoch time of the slide dataset: re-reading every h5 bag vs the in-memory bag cache.

Writes a cohort of feature files of realistic width (1024-d, ResNet-50 layer3) to a temp
dir, then times, in one run, an epoch of `SlideDataset` + `collate_bags` with the cache
disabled (every item reads its files) and a second epoch with the default cache (filled by
the first). Prints both and their ratio.  Usage: python benchmarks/bench_bag_cache.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from napari_dismm.features.h5 import FeatureFile, write_features
from training.cohort import load_cohort
from training.dataset import BagCache, SlideDataset, collate_bags

N_SLIDES, DIM, N10, BATCH = 32, 1024, 800, 4


def write(root: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_SLIDES):
        row = {"patient_id": f"P{i:03d}", "slide_id": f"S{i:03d}", "label": "ab"[i % 2]}
        for mag, n in (("10x", N10), ("20x", 4 * N10)):
            n = int(n * rng.uniform(0.7, 1.3))
            ff = FeatureFile(rng.standard_normal((n, DIM), dtype=np.float32), rng.integers(0, 10**5, (n, 2)))
            write_features(root / f"{mag}_{i}.h5", ff)
            row[f"features_{mag}"] = f"{mag}_{i}.h5"
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    return root / "cohort.csv"


def epoch(ds: SlideDataset) -> float:
    start = time.perf_counter()
    for b in range(0, len(ds), BATCH):
        collate_bags([ds[i] for i in range(b, min(b + BATCH, len(ds)))])
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        csv = write(Path(tmp))
        cohort = load_cohort(cohort_csv=csv, task="classification")
        uncached = SlideDataset(cohort=cohort, cache=BagCache(max_bytes=0))
        cached = SlideDataset(cohort=cohort)
        t_read = min(epoch(uncached) for _ in range(2))
        t_fill = epoch(cached)
        t_hit = min(epoch(cached) for _ in range(2))
        size = cached.cache.nbytes / 1e6
    print(f"{N_SLIDES} slides x 2 magnifications, {DIM}-d, {size:.0f} MB of bags, batch {BATCH}")
    print(f"epoch re-reading h5 : {t_read:.3f} s")
    print(f"epoch filling cache : {t_fill:.3f} s")
    print(f"epoch from cache    : {t_hit:.3f} s")
    print(f"ratio re-read / cached: {t_read / t_hit:.1f}x")
    print("(files were just written, so the OS page cache is warm: re-reading from a cold disk costs more)")


if __name__ == "__main__":
    main()
