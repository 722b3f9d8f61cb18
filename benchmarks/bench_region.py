"""Region prediction time for a 2 x 2 mm region, beside the whole slide, in one run.

A generated 3 x 3 mm slide (12,000 x 12,000 px at 0.25 µm/px, planted tissue); the region
is the centred 2 x 2 mm square. Three runs, CPU, the demo student:
- region, cold: only the region's patches are read and encoded;
- whole slide, cold: every patch (this fills the feature cache);
- region, cached: the same region again, its features taken from the whole-slide cache.

    python benchmarks/bench_region.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

SIDE_PX = 12_000
MPP = 0.25
REGION_MM = 2.0


def main() -> None:
    from napari_dismm.predict import predict_slide
    from napari_dismm.region import predict_region
    from napari_dismm.slide import write_sample_slide

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        slide = write_sample_slide(root / "slide.tif", width=SIDE_PX, height=SIDE_PX, mpp=MPP,
                                   tissue_fraction=0.6, seed=5).path
        half = REGION_MM * 1000 / MPP / 2
        c = SIDE_PX / 2
        region = [[(c - half, c - half), (c + half, c - half), (c + half, c + half), (c - half, c + half)]]
        features = root / "features"
        common = {"slide_path": slide, "model_dir": "demo", "device": "cpu", "features_dir": features}

        t0 = time.perf_counter()
        cold = predict_region(**common, region=region)
        region_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        whole = predict_slide(**common)
        whole_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        cached = predict_region(**common, region=region)
        region_cached = time.perf_counter() - t0
    assert cached.patches.equals(cold.patches.assign(tumor_attention=cached.patches.tumor_attention,
                                                     tme_attention=cached.patches.tme_attention))
    print(f"{REGION_MM:g} x {REGION_MM:g} mm region: {len(cold.patches)} of {len(whole.patches)} patch rows; "
          f"region cold {region_cold:.1f} s, whole slide cold {whole_cold:.1f} s "
          f"(region / whole {region_cold / whole_cold:.2f}); region with cached features {region_cached:.2f} s "
          f"(tissue {cached.timings['tissue']:.2f} s, model {cached.timings['model']:.2f} s)")


if __name__ == "__main__":
    main()
