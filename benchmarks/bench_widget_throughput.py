"""Widget vs command-line prediction throughput on the real CMU slide, side by side.

Each run starts from an empty feature cache (reading and encoding happen), alternating:
- CLI: `predict_slide` as `dismm predict` calls it (batch 32, no cancel);
- widget: the docked DisMM widget's Run in a shown viewer (worker thread, progress timer,
  cancel polled inside the encoder's forward pass), from Run to the layers being shown;
- batch 4: `predict_slide` with the widget's former batch size (cancel polled per batch).
Patches/s = patch rows / wall seconds; the ratio widget / CLI is the figure to watch
(goal >= 0.9). The demo student on efficientnet-lite0 features, CPU.

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


def cli_run(cache: Path, batch_size: int = 32) -> float:
    from napari_dismm.predict import predict_slide

    polls = (lambda: False) if batch_size != 32 else None
    t0 = time.perf_counter()
    pred = predict_slide(slide_path=CMU, model_dir="demo", device="cpu", features_dir=cache / "features",
                         batch_size=batch_size, cancel=polls)
    return len(pred.patches) / (time.perf_counter() - t0)


def widget_run(viewer, widget, app) -> float:
    t0 = time.perf_counter()
    assert widget.run()
    while widget.running:
        app.processEvents()
        time.sleep(0.005)
    app.processEvents()
    assert widget.prediction is not None, widget.status.value
    return len(widget.prediction.patches) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
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
    cli, gui, small = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            cli.append(cli_run(Path(tmp) / f"cli{i}"))
            os.environ["NAPARI_DISMM_CACHE"] = str(Path(tmp) / f"widget{i}")
            gui.append(widget_run(viewer, widget, app))
            small.append(cli_run(Path(tmp) / f"small{i}", batch_size=4))
    c, g, s = statistics.median(cli), statistics.median(gui), statistics.median(small)
    print(f"CMU-1-Small-Region, cold cache, {args.repeats} runs each (median patches/s): CLI {c:.1f}, "
          f"widget {g:.1f}, batch 4 {s:.1f}; widget / CLI {g / c:.2f}, batch 4 / CLI {s / c:.2f}")
    viewer.close()


if __name__ == "__main__":
    main()
