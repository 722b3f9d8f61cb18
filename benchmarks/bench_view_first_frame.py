"""Time from `dismm view SLIDE` to the first rendered frame, beside napari's own floor.

Both are measured from process creation to the first vispy draw, in one run, alternating,
so the ratio (ours / napari with a tiny in-memory image) shows the cost the slide adds.
Printed: the medians of each and the median of the per-pair ratios (each `dismm view` run
over the napari run right after it, which shares its moment's machine load), with the load
average before and after. Needs a display:

    xvfb-run -a python benchmarks/bench_view_first_frame.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from napari_dismm.slide.synthetic import sample_slide_path

    slides = {"sample slide": sample_slide_path(), "CMU-1-Small-Region": CMU}
    floor_cmd = [sys.executable, "-c", FLOOR]
    print(f"load average before: {os.getloadavg()[0]:.2f}; {args.repeats} pairs per slide")
    for name, path in slides.items():
        ours, floor = [], []
        for _ in range(args.repeats):
            ours.append(first_frame([sys.executable, "-m", "napari_dismm.cli", "view", str(path), "--first-frame"]))
            floor.append(first_frame(floor_cmd))
        o, f = statistics.median(ours), statistics.median(floor)
        ratios = [a / b for a, b in zip(ours, floor, strict=True)]
        print(f"{name:20s} dismm view first frame {o:6.2f} s | napari tiny image {f:6.2f} s | "
              f"ratio of medians {o / f:.2f} | median paired ratio {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}-{max(ratios):.2f}]")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
