"""Tiling speed figures, each measured side by side in one run.

1. Prefetch: reading patches of the real CMU slide while a stand-in encoder (a small torch
   CNN on one thread) works on the previous batch, versus reading then encoding in turn.
2. Tissue fractions: the summed-area table (`TissueMask.fractions_in`) versus summing the
   mask under every box, for a 20x grid of a 100 000 x 80 000 px slide's mask.

Run: python benchmarks/tiling_prefetch.py [SLIDE]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_dismm.slide import open_slide
from napari_dismm.tiling import iter_patch_batches, make_grid
from napari_dismm.tissue import TissueMask, detect_tissue

DEFAULT_SLIDE = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "CMU-1-Small-Region.svs"


def _encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 7, stride=4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    ).eval()


def _run(slide, grid, indices, model, *, workers: int, batch: int, reps: int = 1) -> tuple[float, int]:
    start = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for idx, patches in iter_patch_batches(slide, grid, batch_size=batch, num_workers=workers, indices=indices):
            x = torch.from_numpy(patches).permute(0, 3, 1, 2).float().div_(255)
            for _ in range(reps):
                model(x)
            n += len(idx)
    return time.perf_counter() - start, n


def bench_prefetch(path: Path) -> None:
    torch.set_num_threads(1)  # leave the second core to the readers, as extraction on CPU would
    model = _encoder()
    with open_slide(path) as slide:
        grid = make_grid(slide, target_mpp=0.5, tissue=detect_tissue(slide))
        indices = np.resize(np.arange(len(grid)), 4 * len(grid))  # each patch 4x: ~200 reads
        batch = 16
        _run(slide, grid, indices[:batch], model, workers=0, batch=batch)  # warm-up
        t_read, _ = _time_read_only(slide, grid, indices, batch, workers=0)
        t_read2, _ = _time_read_only(slide, grid, indices, batch, workers=2)
        x = torch.rand(batch, 3, 224, 224)
        n_batches = -(-len(indices) // batch)
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(n_batches):
                model(x)
            t_once = time.perf_counter() - t0
        reps = max(1, round(t_read / t_once))  # make encoding cost about as much as reading
        t_enc = t_once * reps
        serial, n = _run(slide, grid, indices, model, workers=0, batch=batch, reps=reps)
        threaded, _ = _run(slide, grid, indices, model, workers=2, batch=batch, reps=reps)
    print(f"prefetch: {n} patches of 224 px at 20x from {path.name}, batch {batch}")
    print(f"  read only           {t_read:6.2f} s  ({n / t_read:6.1f} patch/s, 1 thread)")
    print(f"  read only           {t_read2:6.2f} s  ({n / t_read2:6.1f} patch/s, 2 reader threads)")
    print(f"  encode only         {t_enc:6.2f} s  (stand-in CNN x{reps}, 1 torch thread)")
    print(f"  read then encode    {serial:6.2f} s  (num_workers=0)")
    print(f"  prefetch + encode   {threaded:6.2f} s  (num_workers=2)")
    print(f"  speed-up {serial / threaded:.2f}x  (ideal max(read, encode) = {max(t_read, t_enc):.2f} s)")


def _time_read_only(slide, grid, indices, batch: int, *, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    n = sum(len(i) for i, _ in iter_patch_batches(slide, grid, batch_size=batch, num_workers=workers, indices=indices))
    return time.perf_counter() - start, n


def bench_fractions() -> None:
    rng = np.random.default_rng(0)
    w0, h0 = 100_000, 80_000
    ds = 32.0  # 8 µm/px mask of a 0.25 µm/px slide
    mask = np.zeros((int(h0 / ds), int(w0 / ds)), bool)
    for _ in range(6):
        cy, cx = rng.integers(0, mask.shape[0]), rng.integers(0, mask.shape[1])
        yy, xx = np.ogrid[: mask.shape[0], : mask.shape[1]]
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(100, 400) ** 2
    tm = TissueMask(mask=mask, downsample=(w0 / mask.shape[1], h0 / mask.shape[0]), level0_size=(w0, h0), threshold=0.1)
    step = 448
    xs, ys = np.meshgrid(np.arange(0, w0 - step + 1, step), np.arange(0, h0 - step + 1, step))
    boxes = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, step), np.full(xs.size, step)], axis=1)
    t0 = time.perf_counter()
    tm.fractions_in(boxes[:1])  # builds the summed-area table once per mask
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = tm.fractions_in(boxes)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    dx, dy = tm.downsample
    slow = np.empty(len(boxes))
    for i, (x, y, w, h) in enumerate(boxes):  # whole mask cells touched by the box, no weighting
        c0, c1 = int(x // dx), int(np.ceil((x + w) / dx))
        r0, r1 = int(y // dy), int(np.ceil((y + h) / dy))
        slow[i] = mask[r0:r1, c0:c1].mean()
    t_slow = time.perf_counter() - t0
    print(f"tissue fractions: {len(boxes)} boxes (20x grid of a {w0} x {h0} slide), mask {mask.shape[1]} x {mask.shape[0]}")
    print(f"  summed-area table   {t_fast * 1e3:8.1f} ms  (+ {t_build * 1e3:.0f} ms to build it once)")
    print(f"  per-box mask sums   {t_slow * 1e3:8.1f} ms")
    print(f"  speed-up {t_slow / t_fast:.0f}x  (max |difference| {np.abs(fast - slow).max():.3f}: the loop ignores partial cells)")


if __name__ == "__main__":
    bench_prefetch(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SLIDE)
    bench_fractions()
