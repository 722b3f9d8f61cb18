"""The docked DisMM widget: run a model on a slide layer and look at where it attended.

Why it is built this way:
- Inference runs in a `thread_worker`; the worker also builds the layer-data tuples (pure
  numpy), so the main thread only adds finished layers and the viewer stays responsive.
- Progress is reported by `predict_slide` from the worker thread into a plain attribute;
  a 100 ms QTimer in the main thread copies it into the widget's own progress bar when the
  shown percent or stage changes (Qt objects are touched from the main thread only). Not
  napari's `progress`: its activity indicator animates, and a window holding an OpenGL
  canvas composites the whole window through OpenGL at every repaint (in software under
  Xvfb, VMs and remote desktops): 1,000-2,000 repaints per CMU run took a core from the
  encoder and made the prediction 1.3-2x slower than the same call in the CLI.
- Cancel sets an event that the encoder polls before each of its layers, so a run stops
  within a second while batches stay as large as the CLI's (same throughput); a second Run
  while one is going is refused with a message.
- Every user-caused error arrives as a one-line notification; the viewer never dies.
- A second Run or another magnification refills the shown overlay layers (`layers.refill`):
  napari's cost of inserting a layer (~0.1 s each) is paid once per slide.
- Attention fades out towards its low end (`viewer.colormaps`) in a perceptual colormap the
  user picks per subspace, so the H&E stays visible; the only slide layer is pre-selected.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSlider, Label, ProgressBar, PushButton
from napari.layers import Image, Layer, Shapes
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer

from napari_dismm.errors import DismmError
from napari_dismm.viewer.colormaps import PERCEPTUAL
from napari_dismm.viewer.layers.display import (
    add_layer_tuples, prediction_layers_in, region_polygons, restyle_attention,
)
from napari_dismm.viewer.panel import PredictionPanel
from napari_dismm.viewer.layers.prediction import NORMALISATIONS, prediction_layer_data

#: "finest" = the finest magnification present, "all" = every one (napari adds 0.07-0.11 s per layer)
MAGNIFICATION_CHOICES = ("finest", "all", "10x", "20x")
#: finer maps: patch overlap fractions offered (stride = patch x (1 - overlap); `fine_maps`)
OVERLAP_CHOICES = (("none (patch grid)", 0.0), ("0.25", 0.25), ("0.5 (cells half a patch)", 0.5), ("0.75", 0.75))
#: patches per batch on a CPU: the CLI's default; cancel is polled before every layer of the
#: encoder's forward pass (`napari_dismm.cancel_inside`), so large batches still stop in ms
CPU_BATCH_SIZE = 32
GPU_BATCH_SIZE = 32


def _available(prediction, magnification: str | None, notes: list[str]) -> str | None:
    """A magnification the prediction lacks falls back to its finest, with a note."""
    if magnification in (None, "all") or magnification in set(prediction.patches["magnification"]):
        return magnification
    notes.append(f"the prediction has no {magnification} patches; showing its finest magnification")
    return None


def _batch_size(device: str) -> int:
    import torch

    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return GPU_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE


# ---------------------------------------------------------------- the widget


class PredictionWidget(Container):
    """Slide layer + model directory + device -> Run / Cancel -> overlay layers and a panel."""

    def __init__(self, napari_viewer) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.slide = ComboBox(label="slide", choices=self._slide_choices, nullable=True)
        self.model_dir = FileEdit(label="model", mode="d", value="")
        self.demo = CheckBox(text="use the demo model", value=False)
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda"], value="auto")
        self.region = ComboBox(label="region", choices=self._region_choices, nullable=True)
        self.overlap = ComboBox(label="map overlap", choices=list(OVERLAP_CHOICES), value=0.0)
        self.overlap_bag = CheckBox(text="model sees the overlapping grid (default: the grid it was trained on)",
                                    value=False)
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.progress_bar = ProgressBar(value=0, min=0, max=100, visible=False)
        self.magnification = ComboBox(label="magnification", choices=list(MAGNIFICATION_CHOICES), value="finest")
        self.normalisation = ComboBox(label="normalise", choices=list(NORMALISATIONS), value="percentile")
        self.smoothing = FloatSlider(label="smoothing", min=0.0, max=5.0, step=0.25, value=0.0)
        self.opacity = FloatSlider(label="opacity", min=0.0, max=1.0, step=0.05, value=0.6)
        self.tumor_colormap = ComboBox(label="tumor colours", choices=list(PERCEPTUAL), value=PERCEPTUAL[0])
        self.tme_colormap = ComboBox(label="TME colours", choices=list(PERCEPTUAL), value=PERCEPTUAL[1])
        self.fade = CheckBox(text="fade low attention (tissue shows through)", value=True)
        self.open_button = PushButton(text="Open bundle…")
        self.export_button = PushButton(text="Export bundle…")
        self.png_button = PushButton(text="Save view as PNG…")
        self.export_status = Label(value="")
        self.extend([
            self.slide, self.region, self.model_dir, self.demo, self.device, self.overlap, self.overlap_bag,
            self.run_button, self.cancel_button, self.status, self.progress_bar,
            self.magnification, self.normalisation, self.smoothing, self.opacity,
            self.tumor_colormap, self.tme_colormap, self.fade, self.open_button, self.export_button,
            self.export_status, self.png_button,
        ])
        self.panel = PredictionPanel()
        self.native.layout().addWidget(self.panel)

        self.prediction = None
        self._worker = None
        self._export_worker = None
        self.last_export: Path | None = None
        self._cancel = threading.Event()
        self._progress_state: tuple[str, float] = ("starting", 0.0)
        self._progress_shown: tuple[str, int] | None = None
        self._cancelled_at: float | None = None
        self._timer = QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._show_progress)

        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.demo.changed.connect(lambda on: setattr(self.model_dir, "enabled", not on))
        for control in (self.normalisation, self.smoothing, self.opacity, self.tumor_colormap, self.tme_colormap,
                        self.fade):
            control.changed.connect(self._restyle)
        self.magnification.changed.connect(self._rebuild)
        self.open_button.changed.connect(self._ask_open_bundle)
        self.export_button.changed.connect(self._ask_export_bundle)
        self.png_button.changed.connect(self._ask_save_png)
        self.viewer.layers.events.inserted.connect(self._layers_changed)
        self.viewer.layers.events.removed.connect(self._layers_changed)
        self._layers_changed()

    # -- slide choice

    def _slide_choices(self, _widget=None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Image) and layer.metadata.get("dismm_kind") == "slide"]

    def _region_choices(self, _widget=None) -> list[tuple[str, Any]]:
        """Shapes layers a user drew (not the tissue outline): "none" predicts the whole slide."""
        return [(f"{layer.name} (shapes inside only)", layer) for layer in self.viewer.layers
                if isinstance(layer, Shapes) and "dismm_kind" not in layer.metadata]

    def _layers_changed(self, event=None) -> None:
        self.slide.reset_choices()
        self.region.reset_choices()
        slides = self._slide_choices()
        if self.slide.value is None and len(slides) == 1:  # the only slide: nothing to choose
            self.slide.value = slides[0][1]
        inserted = getattr(event, "value", None)
        if event is not None and event.type == "inserted":
            prediction = getattr(inserted, "metadata", {}).get("dismm_prediction")
            if prediction is not None and prediction is not self.prediction:  # a bundle opened by the reader
                self.prediction = prediction
                self.panel.show_prediction(prediction)

    # -- running

    @property
    def running(self) -> bool:
        return self._worker is not None

    def run(self, *_args) -> bool:
        """Start a prediction on the chosen slide; False (with a message) when refused."""
        if self.running:
            show_warning("a prediction is already running: wait for it or press Cancel")
            return False
        layer = self.slide.value
        if layer is None:
            show_error("choose a slide layer first (open a slide with the DisMM reader)")
            return False
        if self.demo.value:
            model: str | Path = "demo"
        else:
            model = Path(self.model_dir.value)
            if str(self.model_dir.value) in ("", ".") or not (model / "config.json").is_file():
                given = str(self.model_dir.value) or "nothing"
                show_error(f"choose a model directory holding config.json (got {given})")
                return False
        region = None
        if self.region.value is not None:
            region = region_polygons(self.region.value, layer)
            if not region:
                show_error(f"the region layer {self.region.value.name!r} has no rectangle or polygon: draw one")
                return False
        from napari_dismm.viewer.triton_guard import keep_triton_out_if_llvm_loaded

        keep_triton_out_if_llvm_loaded()  # before the worker imports torch (see the module)
        self._cancel = threading.Event()
        self._progress_state = ("starting", 0.0)
        self._worker = self._make_worker(region=region,
            slide_path=layer.metadata["slide_path"], model=model, device=self.device.value,
            overlap=float(self.overlap.value), bag="overlap" if self.overlap_bag.value else "grid",
            magnification=self._magnification(), **self._display(),
        )
        self._progress_shown = None
        self.progress_bar.value = 0
        self.progress_bar.visible = True
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = "running…"
        self._timer.start()
        self._worker.start()
        return True

    def _make_worker(self, **kwargs):
        """A worker returning ("done", (prediction, tuples, notes)), ("cancelled", None) or
        ("failed", message): expected outcomes are results, not exceptions, so napari does
        not also pop up a traceback for a user's mistake. Only bugs raise."""
        from napari.qt.threading import thread_worker

        cancel = self._cancel

        reports = self.reports = []
        notes: list[str] = []  # shown by the main thread

        def report(stage: str, fraction: float) -> None:
            self._progress_state = (stage, float(fraction))
            reports.append((time.perf_counter(), stage, float(fraction)))

        def job(*, slide_path, model, device, region, overlap, bag, magnification, **display):
            from napari_dismm.predict import Cancelled, predict_slide

            try:
                common = {"slide_path": slide_path, "model_dir": model, "device": device,
                          "batch_size": _batch_size(device), "progress": report, "cancel": cancel.is_set}
                if region is not None:
                    from napari_dismm.region import predict_region

                    prediction = predict_region(**common, region=region, overlap=overlap, bag=bag)
                elif overlap > 0:
                    from napari_dismm.fine_maps import predict_slide_fine

                    prediction = predict_slide_fine(**common, overlap=overlap, bag=bag)
                else:
                    prediction = predict_slide(**common)
                if cancel.is_set():
                    raise Cancelled("prediction cancelled")
                tuples = prediction_layer_data(prediction, **display,
                                               magnification=_available(prediction, magnification, notes))
            except Cancelled:
                self._cancelled_at = time.perf_counter()
                return "cancelled", None
            except DismmError as error:
                return "failed", str(error)
            return "done", (prediction, tuples, notes)

        return thread_worker(job, start_thread=False, connect={
            "returned": self._on_returned, "errored": self._on_errored, "finished": self._on_finished,
        })(**kwargs)

    def cancel(self, *_args) -> None:
        if not self.running:
            return
        self._cancel.set()
        self.status.value = "cancelling…"
        self.cancel_button.enabled = False

    def _show_progress(self) -> None:
        stage, fraction = self._progress_state
        # encoding is most of the work: features 0-90 %, the model the rest
        overall = {"features": 0.0, "encode": 0.9 * fraction, "model": 0.9 + 0.1 * fraction}.get(stage, 0.0)
        if stage == "features" and fraction >= 1.0:
            overall = 0.9
        shown = (stage, int(round(100 * overall)))
        if shown == self._progress_shown or not self.running or self._cancel.is_set():
            return  # every repaint composites the whole window (see the module docstring)
        self._progress_shown = shown
        self.progress_bar.value = shown[1]
        self.status.value = f"{stage} {shown[1]} %"

    def _on_returned(self, result) -> None:
        self._timer.stop()  # no late progress tick may overwrite the outcome
        outcome, payload = result
        if outcome == "cancelled":
            self.status.value = "cancelled"
            show_info("prediction cancelled")
            return
        if outcome == "failed":
            self.status.value = "failed"
            show_error(payload)
            return
        prediction, tuples, notes = payload
        for note in notes:
            show_warning(note)
        try:
            self._show(prediction, tuples)
        except DismmError as error:
            self.status.value = "failed"
            show_error(str(error))
            return
        done = prediction.predicted_class if prediction.task != "survival" else f"risk {prediction.risk:.3f}"
        self.status.value = f"done: {done}"

    def _on_errored(self, error: Exception) -> None:
        """A bug (napari already shows its traceback): keep the widget usable."""
        self._timer.stop()
        self.status.value = f"failed: {type(error).__name__}"

    def _on_finished(self) -> None:
        self._timer.stop()
        self.progress_bar.visible = False
        self._worker = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False

    # -- showing results

    def _show(self, prediction, tuples) -> list[Layer]:
        self.prediction = prediction
        layers = add_layer_tuples(self.viewer, tuples, prediction=prediction)
        opacity = float(self.opacity.value)
        for layer in layers:
            if layer.metadata.get("dismm_kind") == "attention":
                layer.opacity = opacity
        self.panel.show_prediction(prediction)
        return layers

    def show_prediction(self, prediction) -> list[Layer]:
        """Add the overlays of an existing `Prediction` with the current display settings."""
        notes: list[str] = []
        tuples = prediction_layer_data(prediction, **self._display(),
                                       magnification=_available(prediction, self._magnification(), notes))
        for note in notes:
            show_warning(note)
        return self._show(prediction, tuples)

    def _display(self) -> dict[str, Any]:
        """The display settings of the attention layers, as `prediction_layer_data` takes them."""
        return {"normalisation": self.normalisation.value, "smoothing": float(self.smoothing.value),
                "colormaps": {"tumor": self.tumor_colormap.value, "TME": self.tme_colormap.value},
                "transparent_low": bool(self.fade.value)}

    def _magnification(self) -> str | None:
        value = self.magnification.value
        return None if value == "finest" else value

    def _rebuild(self, *_args) -> None:
        if self.prediction is not None:
            try:
                self.show_prediction(self.prediction)
            except DismmError as error:
                show_error(str(error))

    def _restyle(self, *_args) -> None:
        try:
            restyle_attention(prediction_layers_in(self.viewer), **self._display(), opacity=float(self.opacity.value))
        except DismmError as error:
            show_error(str(error))

    # -- bundles and export

    def open_bundle(self, path: str | Path) -> list[Layer]:
        """Show a bundle's prediction, refusing one computed from another slide than the chosen one."""
        from napari_dismm.bundle import read_bundle
        from napari_dismm.predict import check_bundle_matches_slide

        try:
            prediction = read_bundle(path)
            layer = self.slide.value
            if layer is not None:
                check_bundle_matches_slide(prediction, layer.metadata.get("slide_id"))
            return self.show_prediction(prediction)
        except DismmError as error:
            show_error(str(error))
            return []

    @property
    def exporting(self) -> bool:
        return self._export_worker is not None

    def export_bundle(self, path: str | Path) -> bool:
        """Write the shown prediction as a bundle (prediction.json, patches.csv, GeoJSON, the
        pyramidal overlay TIFFs) in a worker thread: the TIFFs of a large slide take tens of
        seconds, which on the GUI thread froze the viewer. A line under the buttons counts the
        seconds once a second (no animated bar: see the module docstring). False (with a
        message) when refused; the written directory lands in ``last_export``."""
        if self.prediction is None:
            show_error("nothing to export: run a prediction or open a bundle first")
            return False
        if self.exporting:
            show_warning("an export is already running: wait for it")
            return False
        from napari.qt.threading import thread_worker

        from napari_dismm.bundle import write_bundle

        prediction, target = self.prediction, Path(path)

        def job():
            try:
                return "done", write_bundle(prediction, target)
            except (DismmError, OSError) as error:
                return "failed", str(error)

        started = time.perf_counter()

        def tick() -> None:
            self.export_status.value = f"writing the bundle to {target.name} … {time.perf_counter() - started:.0f} s"

        ticker = QTimer()
        ticker.setInterval(1000)
        ticker.timeout.connect(tick)

        def returned(result) -> None:
            outcome, payload = result
            if outcome == "done":
                self.last_export = payload
                self.export_status.value = f"bundle written in {time.perf_counter() - started:.1f} s: {payload.name}"
                show_info(f"prediction written to {payload}")
            else:
                self.export_status.value = "export failed"
                show_error(f"export failed: {payload}")

        def finished() -> None:
            ticker.stop()
            self._export_worker = None
            self.export_button.enabled = True

        self.last_export = None
        self.export_button.enabled = False
        self._export_worker = thread_worker(job, start_thread=False, connect={
            "returned": returned, "errored": lambda error: show_error(f"export failed: {error}"),
            "finished": finished,
        })()
        tick()
        ticker.start()
        self._export_worker.start()
        return True

    def save_png(self, path: str | Path) -> Path | None:
        """A PNG of the current view (canvas only, as on screen)."""
        path = Path(path)
        if path.suffix.lower() != ".png":
            path = path.with_suffix(".png")
        try:
            self.viewer.screenshot(path=str(path), canvas_only=True, flash=False)
        except OSError as error:
            show_error(f"could not save {path}: {error}")
            return None
        return path

    def _ask_open_bundle(self, *_args) -> None:
        from qtpy.QtWidgets import QFileDialog

        folder = QFileDialog.getExistingDirectory(self.native, "Open a DisMM prediction bundle")
        if folder:
            self.open_bundle(folder)

    def _ask_export_bundle(self, *_args) -> None:
        from qtpy.QtWidgets import QFileDialog

        folder = QFileDialog.getExistingDirectory(self.native, "Export the prediction into a folder")
        if folder:
            self.export_bundle(folder)

    def _ask_save_png(self, *_args) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getSaveFileName(self.native, "Save the view as PNG", "view.png", "PNG (*.png)")
        if path:
            self.save_png(path)
