"""Screenshots for the README: the finer map (overlap 0.5) and a region prediction on the
real CMU slide, with the demo model, through the docked widget in a shown viewer.

    xvfb-run -a python benchmarks/screenshots_heatmaps.py [--out docs/img]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

CMU = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "CMU-1-Small-Region.svs"


def wait(widget, app) -> None:
    while widget.running:
        app.processEvents()
        time.sleep(0.01)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_dismm.viewer.widget import PredictionWidget

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 900)
    viewer.open(str(CMU), plugin="napari-dismm")
    widget = PredictionWidget(viewer)
    viewer.window.add_dock_widget(widget, name="DisMM")
    widget.demo.value = True
    widget.device.value = "cpu"
    widget.overlap.value = 0.5
    widget.run()
    wait(widget, app)
    viewer.layers["patches"].visible = False
    viewer.reset_view()
    viewer.screenshot(path=str(args.out / "finer_map.png"), canvas_only=False, flash=False)
    # a region: a 0.4 x 0.5 mm rectangle over the upper tissue
    y0, x0 = 250.0, 300.0
    viewer.add_shapes([np.array([[y0, x0], [y0, x0 + 400], [y0 + 500, x0 + 400], [y0 + 500, x0]])],
                      shape_type="rectangle", name="my region", edge_color="cyan", face_color="transparent",
                      edge_width=6, units=("um", "um"))
    widget.region.value = viewer.layers["my region"]
    widget.overlap.value = 0.0
    widget.run()
    wait(widget, app)
    viewer.layers["patches (region)"].visible = False
    viewer.screenshot(path=str(args.out / "region_prediction.png"), canvas_only=False, flash=False)
    print(f"wrote {args.out / 'finer_map.png'} and {args.out / 'region_prediction.png'}")
    viewer.close()


if __name__ == "__main__":
    main()
