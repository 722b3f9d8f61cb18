"""Time from `dismm view SLIDE` to the first rendered frame, beside napari's own floor.

Both are measured from process creation to the first vispy draw, in one run, alternating,
so the ratio (ours / napari with a tiny in-memory image) shows the cost the slide adds.
Needs a display: run under `xvfb-run -a python benchmarks/bench_view_first_frame.py`.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

REPEATS = 3
CMU = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "CMU-1-Small-Region.svs"

FLOOR = textwrap.dedent(
    """
    import time, psutil, numpy as np, napari
    from qtpy.QtCore import QTimer
    viewer = napari.Viewer(show=True)
    viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True)
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    started = psutil.Process().create_time()
    def on_draw(event):
        canvas.events.draw.disconnect(on_draw)
        print(f"first-frame-seconds {time.time() - started:.3f}", flush=True)
        QTimer.singleShot(0, viewer.close)
    canvas.events.draw.connect(on_draw)
    napari.run()
    """
)


def first_frame(command: list[str]) -> float:
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("first-frame-seconds"))
    return float(line.split()[1])


def main() -> None:
    from napari_dismm.slide.synthetic import sample_slide_path

    slides = {"sample slide": sample_slide_path(), "CMU-1-Small-Region": CMU}
    floor_cmd = [sys.executable, "-c", FLOOR]
    for name, path in slides.items():
        ours, floor = [], []
        for _ in range(REPEATS):
            ours.append(first_frame([sys.executable, "-m", "napari_dismm.cli", "view", str(path), "--first-frame"]))
            floor.append(first_frame(floor_cmd))
        o, f = statistics.median(ours), statistics.median(floor)
        print(f"{name:20s} dismm view first frame {o:6.2f} s | napari tiny image {f:6.2f} s | ratio {o / f:.2f}")


if __name__ == "__main__":
    main()
