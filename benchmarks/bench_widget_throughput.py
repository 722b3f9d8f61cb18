"""Widget vs command-line prediction throughput on the real CMU slide, side by side.

Each run starts from an empty feature cache (reading and encoding happen), alternating:
- CLI: `predict_slide` as `dismm predict` calls it (batch 32, no cancel);
- widget: the docked DisMM widget's Run in a shown viewer (worker thread, progress timer,
  cancel polled inside the encoder's forward pass), from Run to the layers being shown;
- batch 4: `predict_slide` with the widget's former batch size (cancel polled per batch).
Patches/s = patch rows / wall seconds (the widget's includes adding the layers), and over
the prediction alone (`Prediction.timings["total"]`); the ratio widget / CLI is the figure
to watch (goal >= 0.9). Runs rotate their order. The demo student on efficientnet-lite0
features, CPU.

    xvfb-run -a python benchmarks/bench_widget_throughput.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

CMU = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "CMU-1-Small-Region.svs"


def cli_run(cache: Path, batch_size: int = 32) -> tuple[float, float]:
    """(patches/s over the wall time, patches/s over the prediction itself)."""
    from napari_dismm.predict import predict_slide

    polls = (lambda: False) if batch_size != 32 else None
    t0 = time.perf_counter()
    pred = predict_slide(slide_path=CMU, model_dir="demo", device="cpu", features_dir=cache / "features",
                         batch_size=batch_size, cancel=polls)
    wall = time.perf_counter() - t0
    return len(pred.patches) / wall, len(pred.patches) / pred.timings["total"]


def widget_run(viewer, widget, app) -> tuple[float, float]:
    """The same two rates for the widget: Run -> layers shown, and the worker's prediction."""
    from qtpy.QtCore import QEventLoop

    t0 = time.perf_counter()
    assert widget.run()
    loop = QEventLoop()  # napari's own event loop, idle between events (no polling here)
    widget._worker.finished.connect(loop.quit)
    loop.exec()
    wall = time.perf_counter() - t0
    pred = widget.prediction
    assert pred is not None, widget.status.value
    return len(pred.patches) / wall, len(pred.patches) / pred.timings["total"]


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_dismm.viewer.widget import PredictionWidget

    viewer = napari.Viewer(show=True)
    viewer.open(str(CMU), plugin="napari-dismm")
    widget = PredictionWidget(viewer)
    viewer.window.add_dock_widget(widget, name="DisMM")
    widget.demo.value = True
    widget.device.value = "cpu"
    app = QApplication.instance()
    runs: dict[str, list[tuple[float, float]]] = {"CLI": [], "widget": [], "batch 4": []}
    order = list(runs)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name in order[i % 3:] + order[:i % 3]:  # rotate, so no one always runs first
                cache = Path(tmp) / f"{name.replace(' ', '')}{i}"
                if name == "widget":
                    os.environ["NAPARI_DISMM_CACHE"] = str(cache)
                    runs[name].append(widget_run(viewer, widget, app))
                else:
                    runs[name].append(cli_run(cache, batch_size=32 if name == "CLI" else 4))
    med = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for name, rs in runs.items()}
    print(f"CMU-1-Small-Region, cold cache, {args.repeats} runs each, torch threads {torch_threads()}; "
          "median patches/s (wall | prediction only):")
    for name, (wall, own) in med.items():
        print(f"  {name:8s} {wall:5.1f} | {own:5.1f}   ratio to CLI {wall / med['CLI'][0]:.2f} | {own / med['CLI'][1]:.2f}")
    viewer.close()


if __name__ == "__main__":
    main()
