"""Widget vs command-line prediction throughput on the real CMU slide, side by side.

Every run starts from an empty feature cache (the slide is read and encoded), the demo
student on efficientnet-lite0 features, CPU, batch 32 on both sides. Patches/s = the
slide's patch rows / wall seconds; the figure to watch is widget / CLI (goal >= 0.9).
Two situations, each alternating its two sides:

- first run: a fresh process each. CLI = `dismm predict CMU --model demo --out DIR` from
  process start to exit (imports, model load, writing the bundle). Widget = napari already
  showing the slide with the DisMM widget docked (not timed), then from *Run* to the next
  drawn frame after the overlay layers are added (imports, model load, the first insertion
  of the six layers, the first draw of their visuals). napari's default settings.
- again: one viewer process with everything imported and the layers shown once. CLI =
  `predict_slide(...)` called in that process (no bundle written). Widget = *Run* to the
  next drawn frame after its layers are refilled.

The widget's wall includes everything the CLI's does not (the worker thread, the progress
timer, cancel polled inside the encoder, building and showing the layers); the "prediction
only" column is `Prediction.timings["total"]` of the same runs.

    xvfb-run -a python benchmarks/bench_widget_throughput.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

CMU = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "CMU-1-Small-Region.svs"

WIDGET_FIRST = textwrap.dedent(
    """
    import os, sys
    from qtpy.QtWidgets import QApplication
    sys.path.insert(0, os.path.join(sys.argv[2], "benchmarks"))
    from bench_widget_throughput import open_with_widget, run_until_drawn
    viewer, widget = open_with_widget(sys.argv[1])
    for _ in range(20):
        QApplication.processEvents()
    wall, pred = run_until_drawn(viewer, widget)
    print(f"RESULT {len(pred.patches)} {wall:.3f} {pred.timings['total']:.3f}", flush=True)
    viewer.close()
    """
)


def open_with_widget(slide: str):
    """A shown viewer with the slide open and the DisMM widget docked, demo model, CPU."""
    import napari

    from napari_dismm.viewer.widget import PredictionWidget

    viewer = napari.Viewer(show=True)
    viewer.open(slide, plugin="napari-dismm")
    widget = PredictionWidget(viewer)
    viewer.window.add_dock_widget(widget, name="DisMM")
    widget.demo.value = True
    widget.device.value = "cpu"
    return viewer, widget


def run_until_drawn(viewer, widget):
    """(seconds from Run to the first frame drawn after the layers were added, the Prediction)."""
    from qtpy.QtCore import QEventLoop, QTimer

    canvas = viewer.window._qt_viewer.canvas._scene_canvas  # vispy SceneCanvas (private)
    shown: dict[str, float] = {}

    def on_draw(event) -> None:
        if "layers" in shown and "drawn" not in shown:
            shown["drawn"] = time.perf_counter()

    canvas.events.draw.connect(on_draw)
    t0 = time.perf_counter()
    assert widget.run(), widget.status.value
    # connected after the widget's own handler, which adds the layers: runs once they are in
    widget._worker.returned.connect(lambda _result: shown.setdefault("layers", time.perf_counter()))
    loop = QEventLoop()  # napari's own event loop, idle between events (no polling here)
    widget._worker.finished.connect(loop.quit)
    loop.exec()
    if "drawn" not in shown:  # no frame yet: ask for one and wait for it
        drawn = QEventLoop()

        def quit_after_draw(event) -> None:
            canvas.events.draw.disconnect(quit_after_draw)
            QTimer.singleShot(0, drawn.quit)

        canvas.events.draw.connect(quit_after_draw)
        canvas.update()
        drawn.exec()
    canvas.events.draw.disconnect(on_draw)
    wall = shown["drawn"] - t0
    pred = widget.prediction
    assert pred is not None, widget.status.value
    return wall, pred


def first_runs(repeats: int, tmp: Path) -> dict[str, list[tuple[float, float]]]:
    """(patches/s over the wall, over the prediction alone) per fresh-process run."""
    root = Path(__file__).resolve().parents[1]
    out: dict[str, list[tuple[float, float]]] = {"CLI": [], "widget": []}
    for i in range(repeats):
        for name in (["CLI", "widget"] if i % 2 == 0 else ["widget", "CLI"]):
            cache = tmp / f"first-{name}{i}"
            env = {**os.environ, "NAPARI_DISMM_CACHE": str(cache)}
            if name == "CLI":
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "napari_dismm.cli", "predict", str(CMU), "--model", "demo",
                                "--out", str(tmp / f"bundle{i}"), "--device", "cpu", "--features-dir",
                                str(cache / "features")], env=env, check=True, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                import pandas as pd

                n = len(pd.read_csv(tmp / f"bundle{i}" / "patches.csv"))
                out[name].append((n / wall, float("nan")))
            else:
                done = subprocess.run([sys.executable, "-c", WIDGET_FIRST, str(CMU), str(root)], env=env, check=True,
                                      capture_output=True, text=True, timeout=900)
                line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
                n, wall, own = line.split()[1:]
                out[name].append((int(n) / float(wall), int(n) / float(own)))
    return out


def again_runs(repeats: int, tmp: Path) -> dict[str, list[tuple[float, float]]]:
    from napari_dismm.predict import predict_slide
    from napari_dismm.viewer.triton_guard import keep_triton_out_if_llvm_loaded

    viewer, widget = open_with_widget(str(CMU))
    keep_triton_out_if_llvm_loaded()  # this process imports torch after the canvas is up (see the module)
    os.environ["NAPARI_DISMM_CACHE"] = str(tmp / "warmup")
    run_until_drawn(viewer, widget)  # imports, model load and the first insertion of the layers
    out: dict[str, list[tuple[float, float]]] = {"CLI": [], "widget": []}
    for i in range(repeats):
        for name in (["CLI", "widget"] if i % 2 == 0 else ["widget", "CLI"]):
            cache = tmp / f"again-{name}{i}"
            if name == "widget":
                os.environ["NAPARI_DISMM_CACHE"] = str(cache)
                wall, pred = run_until_drawn(viewer, widget)
            else:
                t0 = time.perf_counter()
                pred = predict_slide(slide_path=CMU, model_dir="demo", device="cpu", features_dir=cache / "features",
                                     batch_size=32)
                wall = time.perf_counter() - t0
            out[name].append((len(pred.patches) / wall, len(pred.patches) / pred.timings["total"]))
    viewer.close()
    return out


def report(title: str, runs: dict[str, list[tuple[float, float]]]) -> None:
    med = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for name, rs in runs.items()}
    print(f"{title}; median patches/s (wall | prediction only):")
    for name, (wall, own) in med.items():
        print(f"  {name:7s} {wall:5.2f} | {own:5.2f}")
    print(f"  widget / CLI: {med['widget'][0] / med['CLI'][0]:.2f} over the wall")
    print("  runs (wall patches/s): " + "; ".join(f"{n}: " + ", ".join(f"{r[0]:.2f}" for r in rs)
                                               for n, rs in runs.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--situations", nargs="+", choices=["first", "again"], default=["first", "again"])
    args = parser.parse_args()
    print(f"CMU-1-Small-Region, cold feature cache, {args.repeats} runs per side, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        if "first" in args.situations:
            report("first run (fresh processes)", first_runs(args.repeats, Path(tmp)))
        if "again" in args.situations:
            report("again (one process, layers refilled)", again_runs(args.repeats, Path(tmp)))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
