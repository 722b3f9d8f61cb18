"""Chunk read speed: our lazy pyramid (the level arrays napari reads) vs raw OpenSlide (and napari-wsi when importable).

For each slide and level, the same chunk-aligned regions (our chunk grid, as napari asks
for them) are read through (a) our level array ``arr[y:y+ch, x:x+cw]`` (slide/levels.py), (b) OpenSlide's
``read_region`` of the same region, (c) napari-wsi's zarr array over OpenSlide (if found:
install it into a throwaway directory and pass ``--napari-wsi DIR``). Each round opens
fresh handles (no warm caches), readers interleaved; the median round is reported.

    python benchmarks/bench_slide_read.py [--chunks 40] [--rounds 3] [--napari-wsi /tmp/nwsi]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openslide

from napari_dismm.slide import open_slide, write_sample_slide

CMU = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "CMU-1-Small-Region.svs"


def _regions(slide, level: int, n: int, seed: int) -> list[tuple[int, int, int, int]]:
    arr = slide.pyramid[level]
    ch, cw = arr.chunks[:2]
    h, w = arr.shape[:2]
    grid = [(cx * cw, cy * ch) for cy in range(-(-h // ch)) for cx in range(-(-w // cw))]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(grid), size=min(n, len(grid)), replace=False)
    return [(grid[i][0], grid[i][1], min(cw, w - grid[i][0]), min(ch, h - grid[i][1])) for i in pick]


def _time_ours(path, level, regions) -> float:
    with open_slide(path) as slide:
        arr = slide.pyramid[level]
        t = time.perf_counter()
        for x, y, w, h in regions:
            arr[y : y + h, x : x + w]
        return (time.perf_counter() - t) / len(regions)


def _time_openslide(path, level, regions) -> float:
    with openslide.OpenSlide(str(path)) as osr:
        ds = osr.level_downsamples[level]
        t = time.perf_counter()
        for x, y, w, h in regions:
            np.asarray(osr.read_region((round(x * ds), round(y * ds)), level, (w, h)))
        return (time.perf_counter() - t) / len(regions)


def _time_napari_wsi(path, level, regions) -> float:
    from napari_wsi.backends.openslide import OpenSlideStore

    store = OpenSlideStore(path)
    try:
        arr = store._pyramid[level][1]
        t = time.perf_counter()
        for x, y, w, h in regions:
            arr[y : y + h, x : x + w]
        return (time.perf_counter() - t) / len(regions)
    finally:
        store.close()


def bench(path: Path, label: str, levels, *, n: int, rounds: int, napari_wsi: bool) -> None:
    with open_slide(path) as slide:
        info = slide.info
        plan = [(lv, _regions(slide, lv, n, seed=lv)) for lv in levels if lv < info.level_count]
    print(f"\n{label}: {info.dimensions[0]}x{info.dimensions[1]}, {info.level_count} levels, chunks {info.tile_size}")
    for level, regions in plan:
        readers = {"ours": _time_ours, "openslide": _time_openslide}
        if napari_wsi:
            readers["napari-wsi"] = _time_napari_wsi
        times: dict[str, list[float]] = {k: [] for k in readers}
        for _ in range(rounds):
            for name, fn in readers.items():
                times[name].append(fn(path, level, regions))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        cw, ch = regions[0][2], regions[0][3]
        line = ", ".join(f"{k} {v:.2f} ms" for k, v in med.items())
        print(f"  level {level} ({len(regions)} chunks ~{cw}x{ch}): {line}")
        print(f"    ratio ours / openslide = {med['ours (zarr)'] / med['openslide']:.2f}", end="")
        if napari_wsi:
            print(f";  ours / napari-wsi = {med['ours (zarr)'] / med['napari-wsi']:.2f}", end="")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--napari-wsi", type=Path, default=None, help="directory holding a napari-wsi install")
    args = parser.parse_args()
    if args.napari_wsi is not None:
        sys.path.append(str(args.napari_wsi))  # appended: never shadows the main environment
    try:
        import napari_wsi  # noqa: F401

        have_nwsi = True
    except ImportError:
        have_nwsi = False
        print("napari-wsi not importable: comparing with raw OpenSlide only")
    print("napari-lazy-openslide: not benchmarked (fails to import with zarr 3)")
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "sample.tif"
        t = time.perf_counter()
        write_sample_slide(sample, width=8191, height=6143, seed=0)
        print(f"generated 8191x6143 sample in {time.perf_counter() - t:.1f} s")
        bench(sample, "generated JPEG pyramid (512-px tiles)", [0, 1, 2], n=args.chunks, rounds=args.rounds,
              napari_wsi=have_nwsi)
    if CMU.exists():
        label = "CMU-1-Small-Region.svs (240-px tiles)"
        bench(CMU, label, [0], n=args.chunks, rounds=args.rounds, napari_wsi=have_nwsi)
    else:
        print(f"\n{CMU} not found: skipped")


if __name__ == "__main__":
    main()
