"""Whole-slide prediction time split into read, encode, model and layers.

Slides: the generated sample slide (8192 x 6144 px, 0.25 µm/px) and the real CMU-1-Small-Region
(2220 x 2967 px, 0.499 µm/px, beside the repository in ../shared/testdata). Model: a randomly
initialised default-size student on efficientnet-lite0 features (the demo model is not
needed: timing does not depend on trained weights).

Per slide, two runs side by side in this process:
- cold: empty feature cache (tissue, reading and encoding all happen);
- warm: the same call again (feature files reused: no pixel is read or encoded).
"read" is the time the encoder waited for pixels (reading is overlapped with encoding by
worker threads, so only the unhidden part shows); "layers" builds the viewer's layer data
(`napari_dismm.viewer.layers.prediction.prediction_layer_data`) from the prediction.

    python benchmarks/bench_predict.py [--slide PATH ...] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from napari_dismm.model.checkpoint import save_model
from napari_dismm.model.registry import build_model
from napari_dismm.predict import predict_slide

CMU = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "CMU-1-Small-Region.svs"


def layers_seconds(prediction) -> float | None:
    try:
        from napari_dismm.viewer.layers.prediction import prediction_layer_data
    except ImportError:
        return None
    t0 = time.perf_counter()
    prediction_layer_data(prediction)
    return time.perf_counter() - t0


def run(slide: Path, model: Path, features: Path, *, batch_size: int) -> dict[str, float]:
    polls: list[float] = []

    def cancel() -> bool:
        polls.append(time.perf_counter())
        return False

    t0 = time.perf_counter()
    pred = predict_slide(slide_path=slide, model_dir=model, device="auto", features_dir=features,
                         batch_size=batch_size, cancel=cancel)
    wall = time.perf_counter() - t0
    out = dict(pred.timings)
    out["wall"] = wall
    out["patches"] = float(len(pred.patches))
    layers = layers_seconds(pred)
    out["layers"] = float("nan") if layers is None else layers
    gaps = [b - a for a, b in zip(polls, polls[1:], strict=False)]
    out["max_poll_gap"] = max(gaps) if gaps else 0.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, action="append", help="slide(s) to time (default: sample + CMU)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    slides = args.slide
    if not slides:
        from napari_dismm.slide import sample_slide_path

        slides = [sample_slide_path()] + ([CMU] if CMU.exists() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cuda={torch.cuda.is_available()}, batch size {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        model = build_model({"kind": "student", "task": "classification", "n_outputs": 4, "d_in": 1280})
        save_model(model, root / "model", extra={"encoder": "efficientnet-lite0", "magnifications": ["10x", "20x"]})
        cols = ("tissue", "read", "encode", "features_other", "features_io", "model", "layers", "wall")
        print(f"{'slide':<28} {'run':<5} {'patches':>7} " + " ".join(f"{c:>14}" for c in cols) + f" {'max poll gap':>13}")
        for slide in slides:
            features = root / f"features-{slide.stem}"
            results = {}
            for label in ("cold", "warm"):
                r = run(slide, root / "model", features, batch_size=args.batch_size)
                results[label] = r
                print(f"{slide.name[:28]:<28} {label:<5} {int(r['patches']):>7} "
                      + " ".join(f"{r.get(c, 0.0):>13.3f}s" for c in cols) + f" {r['max_poll_gap']:>12.3f}s")
            cold, warm = results["cold"], results["warm"]
            per_patch = 1000 * cold["encode"] / max(1.0, cold["patches"])
            print(f"  -> encode {per_patch:.1f} ms/patch; warm/cold wall ratio {warm['wall'] / cold['wall']:.3f} "
                  f"(cache speed-up x{cold['wall'] / warm['wall']:.1f}); encode share of cold "
                  f"{cold['encode'] / cold['wall']:.0%}")


if __name__ == "__main__":
    main()
