"""Extraction throughput: does reading overlap with the encoder?

For each slide, measured side by side in one run (best of interleaved repeats, the usual
estimate of capacity on a machine other processes also use):
- read + decode alone: `iter_patch_batches` consumed with no encoder;
- encoder alone: the same patches, already in memory, through `Encoder.encode`;
- end to end: `extract_slide` into an empty folder (open, tissue, grid, read, encode,
  write the h5) and, separately, the read+encode loop alone (`encode_grid`).
The figure is end-to-end patches/s ÷ min(read alone, encoder alone); 1.0 means the slower
stage alone sets the pace (perfect overlap), goal >= 0.85.

Slides: the slide layer's generated sample (8192 x 6144 px, 0.25 µm/px) and the real CMU
slide (Aperio SVS, 0.499 µm/px) from ../shared/testdata.

Run: python benchmarks/bench_extract.py [--repeats 3] [--batch-size 32] [--workers 2]
     [--threads N] [--magnification 20x] [--slide PATH ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_dismm.features.encoders import get_encoder
from napari_dismm.features.extract import encode_grid, extract_slide
from napari_dismm.slide import open_slide
from napari_dismm.slide.synthetic import sample_slide_path
from napari_dismm.tiling import iter_patch_batches, magnification_to_mpp, make_grid, read_patches
from napari_dismm.tissue import detect_tissue

CMU = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "CMU-1-Small-Region.svs"


def bench_slide(path: Path, *, encoder, mag: str, batch: int, workers: int, repeats: int) -> float:
    with open_slide(path) as slide:
        grid = make_grid(slide, target_mpp=magnification_to_mpp(mag), tissue=detect_tissue(slide))
        n = len(grid)
        in_memory = read_patches(slide, grid, np.arange(n))  # also warms the OS file cache
        encoder.encode(in_memory[:batch])  # warm-up (allocations, oneDNN kernels)

        def read_alone() -> float:
            t0 = time.perf_counter()
            for _ in iter_patch_batches(slide, grid, batch_size=batch, num_workers=workers):
                pass
            return time.perf_counter() - t0

        def encode_alone() -> float:
            t0 = time.perf_counter()
            for i in range(0, n, batch):
                encoder.encode(in_memory[i : i + batch])
            return time.perf_counter() - t0

        def pipeline() -> float:
            t0 = time.perf_counter()
            encode_grid(slide, grid, encoder, batch_size=batch, num_workers=workers)
            return time.perf_counter() - t0

        def end_to_end() -> float:
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                result = extract_slide(
                    slide_path=path, out_dir=out, encoder=encoder, magnifications=[mag],
                    batch_size=batch, num_workers=workers,
                )
                seconds = time.perf_counter() - t0
            assert result.outputs[0].n_patches == n and not result.skipped
            return seconds

        times: dict[str, list[float]] = {"read": [], "encode": [], "pipeline": [], "e2e": []}
        for _ in range(repeats):  # interleaved, so load from elsewhere hits all alike
            times["read"].append(read_alone())
            times["encode"].append(encode_alone())
            times["pipeline"].append(pipeline())
            times["e2e"].append(end_to_end())
    rate = {k: n / min(v) for k, v in times.items()}
    slower = min(rate["read"], rate["encode"])
    ratio = rate["e2e"] / slower
    w, h = slide.info.level_dimensions[0]
    print(f"\n{path.name}: {w} x {h} px, {slide.info.mpp:g} µm/px, {n} patches of 224 px at {mag}")
    print(f"  read + decode alone ({workers} threads)   {rate['read']:8.1f} patch/s")
    print(f"  encoder alone (in memory, batch {batch:>3})  {rate['encode']:8.1f} patch/s")
    print(f"  read+encode loop (encode_grid)        {rate['pipeline']:8.1f} patch/s"
          f"   ratio {rate['pipeline'] / slower:.2f}")
    print(f"  end to end (extract_slide, + tissue,  {rate['e2e']:8.1f} patch/s"
          f"   ratio {ratio:.2f}  (goal >= 0.85)")
    print("    grid, h5 write)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--magnification", default="20x")
    parser.add_argument("--slide", type=Path, nargs="*", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    slides = args.slide or [sample_slide_path(), CMU]
    encoder = get_encoder("efficientnet-lite0", device="auto")
    print(f"encoder {encoder.name} on {encoder.device}, torch threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, read workers {args.workers}, best of {args.repeats}")
    ratios = {}
    for path in slides:
        if not path.exists():
            print(f"\n{path}: not found, skipped")
            continue
        ratios[path.name] = bench_slide(
            path, encoder=encoder, mag=args.magnification, batch=args.batch_size,
            workers=args.workers, repeats=args.repeats,
        )
    print("\nsummary: end-to-end / slower stage: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
