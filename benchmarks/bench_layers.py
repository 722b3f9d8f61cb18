"""Prediction overlays at scale, and the viewer's responsiveness during inference.

1. Build and add all overlay layers of a 100k-patch prediction (100k patches at 20x plus
   25k at 10x) to a shown viewer: seconds and RSS growth (goal < 0.3 s, < 50 MB). Side by
   side, the naive alternative the design rejects: painting the tumor attention onto a
   full-resolution level-0 canvas (one float32 per level-0 pixel) -- the ratio is printed.
   Also timed: until the canvas has drawn its first frame with the layers, and the floor
   -- the same six layer types with tiny data through the same code path, in the same
   run -- which is napari's fixed per-layer cost (layer controls, vispy visuals, the
   colorbar) that no choice of layer data can remove. Then the same overlays replacing
   shown ones, as a second Run (other scores) or a magnification change (10x -> 20x) does:
   refilled in place (``viewer.layers.refill``, the widget's way) vs removed and added anew.
2. Event-loop latency while an inference worker runs (`thread_worker`, as the widget does):
   a QTimer fires every 10 ms and records how late it is; max and p95 lag (goal < 100 ms).
   The worker does real CPU work (torch matmuls, which release the GIL like a model's
   forward pass) plus pure-Python work that holds the GIL, compared with an idle loop.

Layer controls: the viewers `dismm view` / `dismm demo` open ask napari for dynamic layer
controls (one controls panel for the selected layer, built when selected; see
``viewer.app.prefer_dynamic_layer_controls``), so this process measures that. The same adds
with napari's default (a panel built per layer as it is added, what a user's own napari
does unless they switch it on) run in a child process, as the setting is per process; the
ratio of the two is printed.

Run: ``python benchmarks/bench_layers.py`` (uses Xvfb when there is no display).
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import psutil

from napari_dismm.bundle import Prediction

MPP = 0.25
PATCH_20X = 448  # level-0 px of a 224 px patch at 0.5 µm/px on a 0.25 µm/px slide


def big_prediction(n_fine: int = 100_000, seed: int = 0) -> Prediction:
    """A square-ish tissue block of ``n_fine`` 20x patches and the matching 10x patches."""
    rng = np.random.default_rng(seed)
    tables = []
    for mag, size, n in (("20x", PATCH_20X, n_fine), ("10x", 2 * PATCH_20X, n_fine // 4)):
        side = int(np.ceil(np.sqrt(n)))
        idx = np.arange(n)
        x, y = (idx % side) * size + 1000, (idx // side) * size + 1000
        att = rng.gamma(1.0, size=n)
        tables.append(pd.DataFrame({
            "x": x, "y": y, "width": size, "height": size, "magnification": mag,
            "tumor_attention": att / att.sum(), "tme_attention": att[::-1] / att.sum(),
            "ita_cluster": rng.integers(0, 2, n), "ita_centre": idx < 2,
        }))
    patches = pd.concat(tables, ignore_index=True)
    extent = int(patches.x.max() + 2000)
    ring = [(900, 900), (extent, 900), (extent, extent), (900, extent)]
    return Prediction(
        slide_id="bench", slide_name="bench.tif", model_id="bench", model_kind="student",
        task="classification", class_names=["a", "b"], probabilities=[0.4, 0.6], predicted_class="b",
        risk=None, survival=None, bin_edges=None, trained_for="benchmark", mpp=MPP,
        level0_size=(extent + 1000, extent + 1000), patches=patches, tissue_contours=[ring],
    )


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _frame_clock(viewer):
    """Records when the canvas draws its first frame after the last layer insert.

    A frame may be drawn synchronously inside the adds (Qt repaints a resized GL canvas at
    once) or by the event loop afterwards; either counts."""
    canvas = viewer.window._qt_viewer.canvas._scene_canvas  # vispy SceneCanvas (private, bench only)
    state = {"inserted": 0.0, "drawn": None}

    def on_insert(event=None):
        state["inserted"], state["drawn"] = time.perf_counter(), None

    def on_draw(event=None):
        if state["drawn"] is None:
            state["drawn"] = time.perf_counter()

    viewer.layers.events.inserted.connect(on_insert)
    canvas.events.draw.connect(on_draw, position="last")  # after the scene is drawn

    def wait(timeout: float = 30.0) -> float:
        from qtpy.QtWidgets import QApplication

        end = time.perf_counter() + timeout
        while state["drawn"] is None and time.perf_counter() < end:
            QApplication.processEvents()
        viewer.layers.events.inserted.disconnect(on_insert)
        canvas.events.draw.disconnect(on_draw)
        return state["drawn"] if state["drawn"] is not None else math.nan

    return wait


def bench_layers(viewer, prediction: Prediction | None, *, magnification: str | None = None,
                 shown: tuple[Prediction, str | None] | None = None, refill: bool = True) -> dict[str, float]:
    """Build the layer data and add it; ``prediction=None`` adds the floor instead: one
    tiny (2 x 2 / 1-point / 1-polygon) layer of each overlay layer type, same placement.
    ``shown``: (prediction, magnification) of overlays already shown (untimed) that the
    timed add replaces, as a second Run or a magnification change does: refilled in place
    (``refill``, what the widget does) or removed and added anew (what it did before)."""
    from qtpy.QtWidgets import QApplication

    from napari_dismm.viewer.layers.prediction import prediction_layer_data
    from napari_dismm.viewer.layers.display import add_layer_tuples, prediction_layers_in

    if shown is not None:
        add_layer_tuples(viewer, prediction_layer_data(shown[0], magnification=shown[1]), prediction=shown[0])
    QApplication.processEvents()  # nothing pending from the previous run
    gc.collect()
    wait_frame = _frame_clock(viewer)
    rss0, c0, t0 = rss_mb(), time.process_time(), time.perf_counter()
    if prediction is None:
        tuples = tiny_layer_data()
    else:
        tuples = prediction_layer_data(prediction, magnification=magnification)
    build = time.perf_counter() - t0
    if shown is not None and not refill:
        with viewer.layers.batched_update():
            for layer in prediction_layers_in(viewer):
                viewer.layers.remove(layer)
    layers = add_layer_tuples(viewer, tuples, prediction=prediction)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    rss1 = rss_mb()
    frame = wait_frame() - t0
    with viewer.layers.batched_update():
        for layer in layers:
            viewer.layers.remove(layer)
    return {"seconds": seconds, "cpu_s": cpu, "build_s": build, "rss_mb": rss1 - rss0, "layers": len(layers),
            "frame_s": frame, "per_layer_add_s": (seconds - build) / max(len(layers), 1)}


def tiny_layer_data() -> list:
    """The floor: the default overlay layer types with almost no data (napari's fixed cost)."""
    meta = {"slide_id": "floor", "dismm_kind": "attention"}
    place = {"scale": (MPP, MPP), "units": ("um", "um")}
    tiny = np.zeros((2, 2), np.float32)
    return [
        ([np.array([[0.0, 0.0], [0.0, 9.0], [9.0, 9.0]])], {"name": "floor shapes", **place, "shape_type": "polygon",
                                                          "metadata": dict(meta)}, "shapes"),
        (tiny, {"name": "floor image 1", **place, "metadata": dict(meta)}, "image"),
        (tiny, {"name": "floor image 2", **place, "metadata": dict(meta), "visible": False}, "image"),
        (tiny.astype(np.int32), {"name": "floor labels", **place, "metadata": dict(meta), "visible": False}, "labels"),
        (np.zeros((1, 2)), {"name": "floor points 1", **place, "metadata": dict(meta)}, "points"),
        (np.zeros((1, 2)), {"name": "floor points 2", **place, "metadata": dict(meta), "visible": False}, "points"),
    ]


def bench_canvas(prediction: Prediction, *, sample: int = 2000) -> dict[str, float]:
    """The rejected design: a level-0 float32 canvas with each 20x patch painted in.

    The whole canvas does not fit in memory (that is the point), so its size is computed
    and the painting is timed on the bounding box of the first ``sample`` patches, then
    scaled by the number of patches."""
    rows = prediction.patches[prediction.patches.magnification == "20x"].iloc[:sample]
    w, h = prediction.level0_size
    x0, y0 = int(rows.x.min()), int(rows.y.min())
    x1, y1 = int((rows.x + rows.width).max()), int((rows.y + rows.height).max())
    t0 = time.perf_counter()
    canvas = np.full((y1 - y0, x1 - x0), np.nan, dtype=np.float32)
    for x, y, s, v in zip(rows.x.to_numpy() - x0, rows.y.to_numpy() - y0, rows.width.to_numpy(),
                          rows.tumor_attention.to_numpy()):
        canvas[y:y + s, x:x + s] = v
    partial = time.perf_counter() - t0
    n = int((prediction.patches.magnification == "20x").sum())
    return {"seconds": partial * n / len(rows), "mb": w * h * 4 / 2**20}


def settle(viewer, seconds: float = 1.0) -> None:
    """Run the event loop for a while, so pending redraws are done before a latency run."""
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def bench_latency(viewer, *, seconds: float = 4.0, busy: bool = True) -> dict[str, float]:
    """Lag of a 10 ms QTimer while a thread_worker runs (or while idle)."""
    import torch
    from napari.qt.threading import thread_worker
    from qtpy.QtCore import QEventLoop, QTimer

    lags: list[float] = []
    last = [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        lags.append(max(0.0, now - last[0] - 0.010))
        last[0] = now

    def work():
        end = time.perf_counter() + seconds
        a = torch.randn(512, 512)
        while time.perf_counter() < end:
            if busy:
                for _ in range(4):
                    a = torch.tanh(a @ a.T / 512)  # releases the GIL, like a forward pass
                sum(i * i for i in range(20_000))  # holds the GIL, like Python-side batching
            else:
                time.sleep(0.01)
        return True

    loop = QEventLoop()
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(tick)
    worker = thread_worker(work, start_thread=False)()
    worker.finished.connect(loop.quit)
    last[0] = time.perf_counter()
    timer.start()
    worker.start()
    loop.exec()
    timer.stop()
    lag = np.array(lags[1:]) * 1000
    return {"ticks": len(lag), "max_ms": float(lag.max()), "p95_ms": float(np.percentile(lag, 95))}


def static_controls_child(repeats: int = 3) -> None:
    """In a child process with napari's default layer controls: median add seconds as JSON."""
    from napari_dismm.viewer.app import new_viewer, virtual_display

    prediction = big_prediction()
    with virtual_display():
        viewer = new_viewer(show=True)
        try:
            bench_layers(viewer, big_prediction(2000), magnification="all")
            bench_layers(viewer, None)
            runs = {"default": [], "floor": []}
            for _ in range(repeats):
                runs["default"].append(bench_layers(viewer, prediction)["seconds"])
                runs["floor"].append(bench_layers(viewer, None)["seconds"])
            print(json.dumps({case: statistics.median(values) for case, values in runs.items()}))
        finally:
            viewer.close()


def run_static_controls_child(repeats: int) -> dict[str, float]:
    env = dict(os.environ, NAPARI_EXPERIMENTAL_DYNAMIC_LAYER_CONTROLS="0")
    done = subprocess.run([sys.executable, __file__, "--static-controls", str(repeats)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(repeats: int = 3) -> None:
    from napari_dismm.viewer.app import new_viewer, prefer_dynamic_layer_controls, virtual_display

    prefer_dynamic_layer_controls()  # as `dismm view` / `dismm demo` do, before napari reads its settings
    from napari.settings import get_settings

    dynamic = get_settings().experimental.dynamic_layer_controls
    prediction = big_prediction()
    n = len(prediction.patches)
    with virtual_display():
        viewer = new_viewer(show=True)
        try:
            bench_layers(viewer, big_prediction(2000), magnification="all")  # warm-up: imports, shaders
            bench_layers(viewer, None)
            bench_layers(viewer, prediction, shown=(prediction, "10x"))
            canvas = bench_canvas(prediction)
            print(f"layer controls: {'dynamic (as dismm view / demo)' if dynamic else 'napari default'}")
            print(f"patches (rows: 100k at 20x + 25k at 10x) {n};  load average {os.getloadavg()[0]:.1f} "
                  f"on {os.cpu_count()} cores; medians of {repeats} runs, interleaved [min-max]")
            rerun = big_prediction(seed=1)  # the same patches, other scores: a second Run
            cases = {"default": (prediction, None, None, True), "all": (prediction, "all", None, True),
                     "floor": (None, None, None, True),
                     "rerun": (rerun, None, (prediction, None), True),
                     "rerun, remove+add": (rerun, None, (prediction, None), False),
                     "10x -> 20x": (prediction, None, (prediction, "10x"), True),
                     "10x -> 20x, remove+add": (prediction, None, (prediction, "10x"), False)}
            runs: dict[str, list[dict]] = {case: [] for case in cases}
            for _ in range(repeats):
                for case, (pred, mag, shown, refill) in cases.items():
                    runs[case].append(bench_layers(viewer, pred, magnification=mag, shown=shown, refill=refill))
            med = {case: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for case, rs in runs.items()}

            def span(case, key):
                values = [r[key] for r in runs[case]]
                return f"[{min(values):.3f}-{max(values):.3f}]"

            for case in ("default", "all"):
                m = med[case]
                print(f"-- {case} magnification: {m['layers']:.0f} overlay layers")
                print(f"build (pure numpy) seconds       {m['build_s']:.3f}")
                print(f"build+add seconds                {m['seconds']:.3f} {span(case, 'seconds')}   (goal < 0.3: "
                      f"{m['seconds'] / 0.3:.1f}x the goal)")
                print(f"build+add CPU seconds            {m['cpu_s']:.3f} {span(case, 'cpu_s')}")
                print(f"napari add per layer seconds     {m['per_layer_add_s']:.3f}")
                print(f"build+add RSS delta MB           {m['rss_mb']:.1f}   (goal < 50)")
                print(f"until first frame drawn seconds  {m['frame_s']:.3f} {span(case, 'frame_s')}")
            print("-- replacing shown overlays: refilled in place (the widget) vs removed and added anew")
            for case in ("rerun", "10x -> 20x"):
                r, o = med[case], med[f"{case}, remove+add"]
                print(f"{case:12s} build+refill seconds  {r['seconds']:.3f} {span(case, 'seconds')}   "
                      f"remove+add {o['seconds']:.3f} {span(case + ', remove+add', 'seconds')}   "
                      f"ratio {o['seconds'] / r['seconds']:.1f}x  (goal < 0.3: {r['seconds'] / 0.3:.1f}x)")
            f, d = med["floor"], med["default"]
            print(f"-- floor: the same {f['layers']:.0f} layer types, tiny data, same code path")
            print(f"add seconds                      {f['seconds']:.3f} {span('floor', 'seconds')}  "
                  f"({f['seconds'] / f['layers']:.3f} per layer; {f['seconds'] / 0.3:.1f}x the 0.3 s goal)")
            print(f"until first frame drawn seconds  {f['frame_s']:.3f} {span('floor', 'frame_s')}")
            print(f"ratio default/floor seconds      {d['seconds'] / f['seconds']:.2f}x  "
                  f"(data-dependent share {max(d['seconds'] - f['seconds'], 0.0):.3f} s)")
            print(f"level-0 canvas (rejected) s      {canvas['seconds']:.3f}  (extrapolated)")
            print(f"level-0 canvas array MB          {canvas['mb']:.0f}")
            print(f"ratio canvas/grid seconds        {canvas['seconds'] / d['seconds']:.0f}x  (default layers)")
            print(f"ratio canvas/grid memory         {canvas['mb'] / max(d['rss_mb'], 1.0):.0f}x")
            if dynamic:
                static = run_static_controls_child(repeats)
                print("-- napari's default layer controls (one panel per added layer; child process)")
                print(f"build+add seconds                {static['default']:.3f}   floor {static['floor']:.3f}")
                print(f"ratio default controls/dynamic   {static['default'] / d['seconds']:.2f}x  "
                      f"(floor {static['floor'] / f['seconds']:.2f}x)")
            settle(viewer)  # the redraw after the last removal is not idle time
            idle = bench_latency(viewer, busy=False)
            busy = bench_latency(viewer, busy=True)
            print(f"event-loop lag idle   max/p95 ms {idle['max_ms']:.1f} / {idle['p95_ms']:.1f}  "
                  f"({idle['ticks']} ticks)")
            print(f"event-loop lag worker max/p95 ms {busy['max_ms']:.1f} / {busy['p95_ms']:.1f}  "
                  f"({busy['ticks']} ticks, goal < 100)")
            print(f"ratio worker/idle p95            {busy['p95_ms'] / max(idle['p95_ms'], 1e-3):.1f}x")
        finally:
            viewer.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--static-controls":
        static_controls_child(int(sys.argv[2]))
    else:
        main()
