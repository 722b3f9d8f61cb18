"""The docked "DisMM inspect" widget: how do the tumor and TME subspaces separate on a slide?

- Subspaces: a diverging layer (tumor minus TME attention) and a scatter of per-patch
  tumor vs TME attention, linked both ways with a points layer on the slide: a brush in
  the scatter selects those patches on the slide; selecting points on the slide (the
  points layer's select tool) highlights them in the scatter.
- Gallery: the top, bottom and a random baseline of patches per subspace, read lazily
  from the slide layer's pyramid at the model's magnification; a click centres the
  camera on the patch.
- Teacher vs student: with the patient's expression and a teacher model (or a teacher's
  bundle), the teacher's attention is shown beside the student's, with their rank
  correlation per subspace and a layer of where the two disagree.
- Cohort: the slide's risk as a percentile of a training run's held-out predictions, and
  the Kaplan-Meier curves of its risk strata (lifelines) beside the slide's own S(t).
- Figures: `dismm inspect` over a run directory (a subprocess: the plugin never imports
  the training backend), its figures shown here.

Everything works from a prediction bundle alone: no model is needed except to run one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.layers import Layer
from napari.utils.notifications import show_error, show_info
from qtpy.QtGui import QPixmap
from qtpy.QtWidgets import (QComboBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QScrollArea,
                            QSpinBox, QTabWidget, QVBoxLayout, QWidget)

from napari_dismm.errors import DismmError
from napari_dismm.viewer.inspect.layers import (difference_layer_data, gallery_indices, linked_points_data,
                                                patch_centre_world, patch_rows, read_patch, relative_attention)
from napari_dismm.viewer.inspect.views import PatchGallery, SubspaceScatter
from napari_dismm.viewer.layers.prediction import magnifications_of, prediction_layer_data

INSPECT_KINDS = ("inspect_difference", "inspect_points", "inspect_teacher", "inspect_disagreement")
SUBSPACE_COLUMNS = {"tumor": "tumor_attention", "TME": "tme_attention"}


def _path_row(placeholder: str) -> QLineEdit:
    edit = QLineEdit()
    edit.setPlaceholderText(placeholder)
    return edit


class InspectWidget(QWidget):
    """Subspace comparison, gallery, teacher vs student, cohort context, run figures."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.prediction = None
        self.rows = None
        self.magnification: str | None = None
        self.points_layer = None
        self.teacher_prediction = None
        self._syncing = False
        self._worker = None

        self.bundle_path = _path_row("prediction bundle directory (or use the viewer's)")
        self.from_viewer_button = QPushButton("Use the viewer's prediction")
        self.open_button = QPushButton("Open bundle")
        self.mag_choice = QComboBox()
        self.status = QLabel("no prediction yet")
        self.status.setWordWrap(True)
        self.scatter = SubspaceScatter()
        self.scatter.on_brush = self._brushed
        self.gallery = PatchGallery()
        self.gallery.on_click = self.go_to_patch
        self.gallery_subspace = QComboBox()
        self.gallery_subspace.addItems(list(SUBSPACE_COLUMNS))
        self.gallery_k = QSpinBox()
        self.gallery_k.setRange(1, 24)
        self.gallery_k.setValue(6)

        top = QFormLayout()
        top.addRow(self.bundle_path)
        buttons = QHBoxLayout()
        buttons.addWidget(self.from_viewer_button)
        buttons.addWidget(self.open_button)
        top.addRow(buttons)
        top.addRow("magnification", self.mag_choice)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.scatter, "Subspaces")
        self.tabs.addTab(self._gallery_tab(), "Gallery")
        self.tabs.addTab(self._teacher_tab(), "Teacher vs student")
        self.tabs.addTab(self._cohort_tab(), "Cohort")
        self.tabs.addTab(self._figures_tab(), "Figures")
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.status)
        layout.addWidget(self.tabs)

        self.from_viewer_button.clicked.connect(lambda: self._guard(self.use_viewer_prediction))
        self.open_button.clicked.connect(lambda: self._guard(lambda: self.open_bundle(self.bundle_path.text())))
        self.mag_choice.currentTextChanged.connect(self._magnification_changed)
        self.gallery_subspace.currentTextChanged.connect(lambda _t: self._guard(self.build_gallery))
        self.gallery_k.valueChanged.connect(lambda _v: self._guard(self.build_gallery))

    # ------------------------------------------------------------ tabs

    def _gallery_tab(self) -> QWidget:
        tab = QWidget()
        form = QFormLayout(tab)
        form.addRow("subspace", self.gallery_subspace)
        form.addRow("patches per row", self.gallery_k)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.gallery)
        form.addRow(scroll)
        return tab

    def _teacher_tab(self) -> QWidget:
        tab = QWidget()
        form = QFormLayout(tab)
        self.teacher_bundle = _path_row("a teacher's prediction bundle of this slide")
        self.teacher_model = _path_row("or: teacher model directory")
        self.teacher_expression = _path_row("expression table (TSV/CSV)")
        self.teacher_patient = _path_row("patient id")
        self.teacher_button = QPushButton("Compare with the teacher")
        self.agreement_label = QLabel("")
        self.agreement_label.setWordWrap(True)
        for widget in (self.teacher_bundle, self.teacher_model, self.teacher_expression, self.teacher_patient,
                       self.teacher_button, self.agreement_label):
            form.addRow(widget)
        self.teacher_button.clicked.connect(lambda: self._guard(self._compare_clicked))
        return tab

    def _cohort_tab(self) -> QWidget:
        tab = QWidget()
        form = QFormLayout(tab)
        self.cohort_run = _path_row("training run directory (dismm train --out)")
        self.cohort_button = QPushButton("Place the slide in the cohort")
        self.cohort_label = QLabel("")
        self.cohort_label.setWordWrap(True)
        self.cohort_figure = Figure(figsize=(3.4, 2.4), layout="constrained")
        self.cohort_canvas = FigureCanvasQTAgg(self.cohort_figure)
        self.cohort_canvas.setMinimumHeight(180)
        for widget in (self.cohort_run, self.cohort_button, self.cohort_label, self.cohort_canvas):
            form.addRow(widget)
        self.cohort_button.clicked.connect(lambda: self._guard(lambda: self.show_cohort_context(self.cohort_run.text())))
        return tab

    def _figures_tab(self) -> QWidget:
        tab = QWidget()
        form = QFormLayout(tab)
        self.fig_run = _path_row("training run directory")
        self.fig_cohort = _path_row("cohort CSV")
        self.fig_expression = _path_row("expression table")
        self.fig_gene_sets = _path_row("gene sets GMT (optional)")
        self.fig_out = _path_row("output directory for figures")
        self.fig_button = QPushButton("Run dismm inspect")
        self.fig_show = QPushButton("Show figures in the output directory")
        self.fig_label = QLabel("")
        self.fig_label.setWordWrap(True)
        self.fig_images = QVBoxLayout()
        holder = QWidget()
        holder.setLayout(self.fig_images)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(holder)
        for widget in (self.fig_run, self.fig_cohort, self.fig_expression, self.fig_gene_sets, self.fig_out,
                       self.fig_button, self.fig_show, self.fig_label, scroll):
            form.addRow(widget)
        self.fig_button.clicked.connect(lambda: self._guard(self.run_inspect_command))
        self.fig_show.clicked.connect(lambda: self._guard(lambda: self.show_figures(self.fig_out.text())))
        return tab

    def _guard(self, action) -> None:
        try:
            action()
        except DismmError as error:
            show_error(str(error))
            self.status.setText(f"error: {error}")

    # ------------------------------------------------------------ the prediction

    def use_viewer_prediction(self) -> None:
        """The prediction of the most recently added DisMM overlay layer."""
        for layer in reversed(list(self.viewer.layers)):
            prediction = layer.metadata.get("dismm_prediction")
            if prediction is not None:
                self.set_prediction(prediction)
                return
        raise DismmError("no DisMM prediction in the viewer: run the DisMM prediction widget or open a bundle")

    def open_bundle(self, path: str | Path) -> None:
        from napari_dismm.bundle import read_bundle

        if not str(path).strip():
            raise DismmError("give a prediction bundle directory")
        self.set_prediction(read_bundle(path))

    def set_prediction(self, prediction, magnification: str | None = None) -> None:
        self.prediction = prediction
        self.teacher_prediction = None
        mags = magnifications_of(prediction.patches)
        self.mag_choice.blockSignals(True)
        self.mag_choice.clear()
        self.mag_choice.addItems(mags)
        self.mag_choice.setCurrentText(magnification or (mags[-1] if mags else ""))
        self.mag_choice.blockSignals(False)
        self.show_magnification(magnification)

    def _magnification_changed(self, text: str) -> None:
        if self.prediction is not None and text:
            self._guard(lambda: self.show_magnification(text))

    def show_magnification(self, magnification: str | None) -> None:
        self.rows, self.magnification = patch_rows(self.prediction.patches, magnification)
        self._remove_layers(("inspect_difference", "inspect_points", "inspect_disagreement"))
        self._add(difference_layer_data(self.prediction, self.rows, self.magnification))
        self.points_layer = self._add(linked_points_data(self.prediction, self.rows, self.magnification))
        self.points_layer.selected_data.events.items_changed.connect(self._slide_selection_changed)
        tumor, tme = relative_attention(self.rows)
        self.scatter.set_data(tumor, tme, title=f"{self.prediction.slide_name} {self.magnification}: drag to select")
        self.status.setText(f"{self.prediction.slide_name}: {len(self.rows)} patches at {self.magnification}")
        self.build_gallery()

    def _add(self, layer_data) -> Layer:
        data, kwargs, kind = layer_data
        return self.viewer.add_layer(Layer.create(data, kwargs, kind))

    def _remove_layers(self, kinds) -> None:
        for layer in [lay for lay in self.viewer.layers if lay.metadata.get("dismm_kind") in kinds]:
            self.viewer.layers.remove(layer)

    # ------------------------------------------------------------ linking

    def _brushed(self, indices: np.ndarray) -> None:
        self.select_patches(indices, from_scatter=True)

    def select_patches(self, indices, *, from_scatter: bool = False) -> None:
        """Select these rows' points on the slide and highlight them in the scatter."""
        if self.points_layer is None:
            return
        chosen = {int(i) for i in indices}
        self._syncing = True
        try:
            self.points_layer.selected_data = chosen
            self._paint_points(chosen)
            if not from_scatter:
                self.scatter.highlight(sorted(chosen))
        finally:
            self._syncing = False
        self.status.setText(f"{len(chosen)} patch(es) selected at {self.magnification}")

    def _paint_points(self, chosen: set[int]) -> None:
        n = len(self.points_layer.data)
        widths = np.zeros(n)
        widths[list(chosen)] = 0.15
        self.points_layer.border_width = widths

    def _slide_selection_changed(self, *_args) -> None:
        if self._syncing or self.points_layer is None:
            return
        chosen = set(int(i) for i in self.points_layer.selected_data)
        self.scatter.highlight(sorted(chosen))
        self.status.setText(f"{len(chosen)} patch(es) selected on the slide")

    # ------------------------------------------------------------ gallery

    def _slide_layer(self):
        for layer in self.viewer.layers:
            if layer.metadata.get("dismm_kind") == "slide" and (
                    self.prediction is None or layer.metadata.get("slide_id") == self.prediction.slide_id):
                return layer
        return None

    def build_gallery(self) -> None:
        """Top, bottom and random patches of the chosen subspace, read from the slide layer."""
        if self.rows is None:
            return
        layer = self._slide_layer()
        if layer is None:
            self.gallery.clear()
            self.status.setText(self.status.text() + " (open the slide to see the patch gallery)")
            return
        levels = list(layer.data) if layer.multiscale else [layer.data]
        subspace = self.gallery_subspace.currentText()
        values = self.rows[SUBSPACE_COLUMNS[subspace]].to_numpy()
        sections = {}
        for name, picked in gallery_indices(values, k=self.gallery_k.value()).items():
            sections[name] = [
                (int(i), read_patch(levels, self.rows.iloc[i], slide_mpp=self.prediction.mpp, mag=self.magnification),
                 f"{subspace} attention {values[i] * len(values):.2f} x uniform; x={self.rows.x[i]}, y={self.rows.y[i]}")
                for i in picked
            ]
        self.gallery.set_sections(sections)

    def go_to_patch(self, row: int) -> None:
        """Centre the camera on patch ``row`` (of the current magnification) and zoom to it."""
        patch = self.rows.iloc[int(row)]
        camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera
        camera.center = patch_centre_world(patch, self.prediction.mpp)
        scale = float(self.prediction.mpp) if self.prediction.mpp else 1.0
        camera.zoom = 300.0 / (float(patch["height"]) * scale * 3)
        self.select_patches([int(row)])

    # ------------------------------------------------------------ teacher vs student

    def _compare_clicked(self) -> None:
        if self.teacher_bundle.text().strip():
            from napari_dismm.bundle import read_bundle

            self.compare_teacher(read_bundle(self.teacher_bundle.text().strip()))
        else:
            self.run_teacher(self.teacher_model.text().strip(), self.teacher_expression.text().strip(),
                             self.teacher_patient.text().strip())

    def run_teacher(self, model_dir: str, expression: str, patient: str) -> None:
        """Predict the slide with the teacher (in a worker thread), then compare."""
        from napari.qt.threading import thread_worker

        from napari_dismm.inspect.teacher import teacher_genes
        from napari_dismm.predict import predict_slide

        if self.prediction is None:
            raise DismmError("show a student prediction first")
        if not (model_dir and expression and patient):
            raise DismmError("give the teacher model directory, the expression table and the patient id")
        layer = self._slide_layer()
        if layer is None:
            raise DismmError("the teacher reads the slide: open it in the viewer first")
        genes = teacher_genes(model_dir, expression, patient)
        path = layer.metadata["slide_path"]
        from napari_dismm.viewer.triton_guard import keep_triton_out_if_llvm_loaded

        keep_triton_out_if_llvm_loaded()  # before the worker imports torch (see the module)

        @thread_worker
        def job():
            return predict_slide(slide_path=path, model_dir=model_dir, genes=genes, device="cpu", batch_size=4)

        self._worker = job()
        self._worker.returned.connect(lambda teacher: self._guard(lambda: self.compare_teacher(teacher)))
        self._worker.errored.connect(lambda error: show_error(f"teacher: {error}"))
        self.agreement_label.setText("running the teacher ...")
        self._worker.start()

    def compare_teacher(self, teacher) -> dict:
        """Teacher attention beside the student's, and their rank agreement per subspace."""
        from napari_dismm.inspect.agreement import attention_agreement, matched_patches, rank_difference

        if self.prediction is None:
            raise DismmError("show a student prediction first")
        if teacher.slide_id and self.prediction.slide_id and teacher.slide_id != self.prediction.slide_id:
            raise DismmError(f"the teacher's prediction is of slide {teacher.slide_id}, not {self.prediction.slide_id}")
        self.teacher_prediction = teacher
        agreement = attention_agreement(self.prediction.patches, teacher.patches)
        self._remove_layers(("inspect_teacher", "inspect_disagreement"))
        mag = self.magnification if self.magnification in agreement else None
        for data, kwargs, kind in prediction_layer_data(teacher, magnification=mag):
            if kwargs["metadata"].get("dismm_kind") != "attention":
                continue
            kwargs["name"] = "teacher " + kwargs["name"]
            kwargs["metadata"] = {**kwargs["metadata"], "dismm_kind": "inspect_teacher"}
            kwargs["visible"] = False
            self._add((data, kwargs, kind))
        merged = matched_patches(self.rows, teacher.patches)
        for subspace in ("tumor", "tme"):
            diff = rank_difference(merged, subspace)
            rows = merged[["x", "y", "width", "height", "magnification"]].assign(
                tumor_attention=diff, tme_attention=diff)
            from napari_dismm.viewer.layers.prediction import grid_for, mean_grid

            grid = grid_for(rows)
            raw = mean_grid(rows, diff, grid)
            mpp = float(self.prediction.mpp) if self.prediction.mpp else 1.0
            self._add((raw, {
                "name": f"student - teacher rank {subspace}", **grid.world(mpp), "colormap": "coolwarm",
                "contrast_limits": (-1.0, 1.0), "opacity": 0.7, "visible": False, "interpolation2d": "nearest",
                "metadata": {"slide_id": self.prediction.slide_id, "dismm_kind": "inspect_disagreement",
                             "note": "student minus teacher percentile rank: > 0 where the student attends more"},
            }, "image"))
        lines = [f"{mag}: tumor rho {v['tumor']['spearman']:.2f}, TME rho {v['tme']['spearman']:.2f} "
                 f"({v['tumor']['n']} patches)" for mag, v in agreement.items()]
        self.agreement_label.setText("Spearman rank correlation, student vs teacher attention:\n" + "\n".join(lines))
        return agreement

    # ------------------------------------------------------------ cohort context

    def show_cohort_context(self, run_dir: str):
        from napari_dismm.inspect.context import cohort_context
        from napari_dismm.viewer.panel import plot_survival

        if self.prediction is None:
            raise DismmError("show a prediction first")
        if not str(run_dir).strip():
            raise DismmError("give the training run directory")
        context = cohort_context(run_dir.strip(), self.prediction)
        where = f"fold {context.fold}'s held-out patients" if context.fold is not None else "all folds (within-fold ranks)"
        text = (f"{context.value_name}: {context.percentile:.0f}th percentile of {context.n_patients} patients "
                f"({context.model}, {where})")
        if context.logrank_p is not None:
            text += f"; KM strata at the median risk, log-rank p = {context.logrank_p:.3g}"
        self.cohort_label.setText(text)
        self.cohort_figure.clear()
        ax = self.cohort_figure.add_subplot()
        if context.task == "survival":
            for (label, (times, surv)), colour in zip(context.km.items(), ("tab:blue", "tab:orange")):
                ax.step(times, surv, where="post", color=colour, label=f"cohort {label}")
            plot_survival(ax, self.prediction)
            ax.legend(fontsize=7)
        else:
            ax.hist(context.cohort_values, bins=20, color="tab:blue", alpha=0.7)
            value = np.percentile(context.cohort_values, context.percentile)
            ax.axvline(value, color="tab:red", label="this slide")
            ax.set_xlabel(context.value_name, fontsize=8)
            ax.legend(fontsize=7)
        self.cohort_canvas.draw_idle()
        return context

    # ------------------------------------------------------------ disentanglement figures

    def run_inspect_command(self) -> None:
        """`dismm inspect` in a subprocess (worker thread); shows the figures when done."""
        from napari.qt.threading import thread_worker

        run, cohort, out = self.fig_run.text().strip(), self.fig_cohort.text().strip(), self.fig_out.text().strip()
        if not (run and cohort and out):
            raise DismmError("give the run directory, its cohort CSV and an output directory")
        argv = [sys.executable, "-m", "napari_dismm.cli", "inspect", run, "--cohort", cohort, "--out", out]
        if self.fig_expression.text().strip():
            argv += ["--expression", self.fig_expression.text().strip()]
        if self.fig_gene_sets.text().strip():
            argv += ["--gene-sets", self.fig_gene_sets.text().strip()]

        @thread_worker
        def job():
            return subprocess.run(argv, capture_output=True, text=True)

        def done(result) -> None:
            if result.returncode != 0:
                lines = result.stderr.strip().splitlines()
                show_error(lines[-1] if lines else "dismm inspect failed")
                self.fig_label.setText(lines[-1] if lines else "dismm inspect failed")
                return
            self.fig_label.setText(result.stdout.strip())
            self._guard(lambda: self.show_figures(out))

        self._worker = job()
        self._worker.returned.connect(done)
        self.fig_label.setText("running dismm inspect ...")
        self._worker.start()

    def show_figures(self, out: str | Path) -> list[Path]:
        out = Path(str(out).strip())
        summary = out / "summary.json"
        if not summary.is_file():
            raise DismmError(f"{out} has no summary.json: run dismm inspect first")
        document = json.loads(summary.read_text())
        while self.fig_images.count():
            item = self.fig_images.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        shown = []
        for name in document.get("figures", []):
            path = out / name
            if path.is_file():
                label = QLabel()
                label.setPixmap(QPixmap(str(path)).scaledToWidth(420))
                self.fig_images.addWidget(label)
                shown.append(path)
        lines = []
        for model, entry in document.get("models", {}).items():
            cka = ", ".join(f"{m} {v['cka']['mean']:.2f}" for m, v in entry["similarity"].items()
                            if v["cka"]["mean"] is not None)
            lines.append(f"{model}: tumor-vs-TME CKA {cka}")
        if lines:
            self.fig_label.setText("\n".join(lines))
        show_info(f"{len(shown)} figure(s) from {out}")
        return shown
