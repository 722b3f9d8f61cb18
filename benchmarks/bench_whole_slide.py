"""Whole-slide prediction on a generated slide of real size, split by stage, with peak memory.

The slide: 66,000 x 44,000 px at 0.25 µm/px (16.5 x 11 mm) with >= 1 cm² of tissue, written
once by the package's own generator (the path is printed; `--slide` reuses it). Model: the
shipped demo student (efficientnet-lite0 features at 10x and 20x). Two child processes
side by side, so each reports its own peak memory (ru_maxrss):
- cold: empty feature cache (tissue, tiling, reading and encoding all happen);
- cached: the same prediction again (the feature files are reused).
Stages: tissue (mask), tiling (both grids), read (time the encoder waited for pixels that
the reader threads had not prepared), encode, features other (writing h5, bookkeeping),
model, layers (the viewer's layer data), bundle (prediction.json, CSV, GeoJSON detections,
pyramidal overlay TIFFs).

    python benchmarks/bench_whole_slide.py [--slide PATH] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZE = (66_000, 44_000)
MPP = 0.25
TISSUE_FRACTION = 0.6  # the generator's most, of 1.8 cm²: ~1.1 cm² of tissue


def child(slide: Path, cache: Path, out: Path) -> None:
    os.environ["NAPARI_DISMM_CACHE"] = str(cache)
    from napari_dismm.bundle import write_bundle
    from napari_dismm.predict import predict_slide
    from napari_dismm.slide import open_slide
    from napari_dismm.tiling import magnification_to_mpp, make_grid
    from napari_dismm.tissue import detect_tissue
    from napari_dismm.viewer.layers.prediction import prediction_layer_data

    t0 = time.perf_counter()
    pred = predict_slide(slide_path=slide, model_dir="demo", device="cpu", batch_size=32)
    wall = time.perf_counter() - t0
    t = dict(pred.timings)
    with open_slide(slide) as s:  # the tissue / tiling split, timed apart
        t1 = time.perf_counter()
        mask = detect_tissue(s)
        tissue = time.perf_counter() - t1
        t1 = time.perf_counter()
        for mag in (10, 20):
            make_grid(s, target_mpp=magnification_to_mpp(mag), patch_size=224, tissue=mask)
        tiling = time.perf_counter() - t1
        tissue_cm2 = float(mask.mask.mean()) * SIZE[0] * SIZE[1] * (MPP * 1e-4) ** 2
    t1 = time.perf_counter()
    prediction_layer_data(pred)
    layers = time.perf_counter() - t1
    t1 = time.perf_counter()
    write_bundle(pred, out)
    bundle = time.perf_counter() - t1
    print(json.dumps({
        "patches": len(pred.patches), "wall": wall, "tissue": tissue, "tiling": tiling,
        "read": t.get("read", 0.0), "encode": t.get("encode", 0.0), "features_other": t.get("features_other", 0.0),
        "model": t.get("model", 0.0), "layers": layers, "bundle": bundle, "tissue_cm2": tissue_cm2,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dismm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    slide = args.slide or work / "big.tif"
    if not slide.exists():
        from napari_dismm.slide import write_sample_slide

        t0 = time.perf_counter()
        write_sample_slide(slide, width=SIZE[0], height=SIZE[1], mpp=MPP, tissue_fraction=TISSUE_FRACTION, seed=11)
        print(f"wrote {slide} in {time.perf_counter() - t0:.0f} s", flush=True)
    cache = work / "cache"
    rows = {}
    for phase in ("cold", "cached"):
        command = [sys.executable, __file__, "--child", str(slide), str(cache), str(work / f"bundle-{phase}")]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows[phase] = json.loads(out.strip().splitlines()[-1])
        print(phase, json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[phase].items()}),
              flush=True)
    cold, cached = rows["cold"], rows["cached"]
    print(f"{cold['patches']} patch rows: cold {cold['wall']:.0f} s, cached features {cached['wall']:.1f} s "
          f"(ratio {cold['wall'] / cached['wall']:.0f}x); "
          f"peak RSS {cold['peak_rss_mb']:.0f} / {cached['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
