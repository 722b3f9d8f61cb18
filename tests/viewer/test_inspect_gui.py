"""The DisMM inspect widget in a real viewer under Xvfb, from a prediction alone (no model):
the scatter brush selects the expected patches on the slide and a slide selection
highlights the scatter; a gallery click moves the camera to the patch; the teacher
comparison and the cohort context fill their panels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.backend_bases import MouseEvent

from napari_dismm.bundle import Prediction, write_bundle
from napari_dismm.slide import write_sample_slide

pytestmark = pytest.mark.gui

MPP = 0.5
SIZE20 = 224  # a 224 px patch at 20x (0.5 µm/px) spans 224 level-0 px at 0.5 µm/px
COLS, ROWS = 6, 5
TUMOR_HOT = {7, 8, 13}  # high tumor, low TME attention
TME_HOT = {20, 27}  # high TME, low tumor attention


def planted_patches() -> pd.DataFrame:
    n = COLS * ROWS
    tumor, tme = np.ones(n), np.ones(n)
    tumor[list(TUMOR_HOT)], tme[list(TME_HOT)] = 6.0, 5.0
    tumor[list(TME_HOT)], tme[list(TUMOR_HOT)] = 0.2, 0.3
    return pd.DataFrame({
        "x": [100 + (i % COLS) * SIZE20 for i in range(n)], "y": [80 + (i // COLS) * SIZE20 for i in range(n)],
        "width": SIZE20, "height": SIZE20, "magnification": "20x",
        "tumor_attention": tumor / tumor.sum(), "tme_attention": tme / tme.sum(), "ita_cluster": -1,
        "ita_centre": False,
    })


def make_prediction(slide_id: str, patches: pd.DataFrame, **kw) -> Prediction:
    fields = dict(slide_id=slide_id, slide_name="small.tif", model_id="abc", model_kind="student", task="survival",
                  class_names=[], probabilities=None, predicted_class=None, risk=0.9, survival=[0.9, 0.7, 0.5, 0.3],
                  bin_edges=[0.0, 10.0, 20.0, 30.0, None], trained_for="test", mpp=MPP, level0_size=(1600, 1300),
                  patches=patches)
    return Prediction(**{**fields, **kw})


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    return write_sample_slide(tmp_path_factory.mktemp("inspect_gui") / "small.tif", width=1600, height=1300,
                              mpp=MPP, seed=7).path


@pytest.fixture
def setup(make_napari_viewer, slide_path):
    from napari_dismm.viewer.inspect.widget import InspectWidget

    viewer = make_napari_viewer(show=True)
    viewer.open(str(slide_path), plugin="napari-dismm")
    slide_id = viewer.layers[0].metadata["slide_id"]
    widget = InspectWidget(viewer)
    viewer.window.add_dock_widget(widget, name="DisMM inspect")
    prediction = make_prediction(slide_id, planted_patches())
    widget.set_prediction(prediction)
    return viewer, widget, prediction


def _camera(viewer):
    return viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera


def _drag(scatter, start, end) -> None:
    """A left-button drag in the scatter's canvas, from and to data coordinates."""
    canvas = scatter.canvas
    canvas.draw()
    (x0, y0), (x1, y1) = scatter.display_xy(*start), scatter.display_xy(*end)
    canvas.callbacks.process("button_press_event", MouseEvent("button_press_event", canvas, x0, y0, button=1))
    for t in np.linspace(0, 1, 5)[1:]:
        x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
        canvas.callbacks.process("motion_notify_event", MouseEvent("motion_notify_event", canvas, x, y, button=1))
    canvas.callbacks.process("button_release_event", MouseEvent("button_release_event", canvas, x1, y1, button=1))


def test_diverging_layer_and_the_scatter_brush_linked_with_the_slide(setup, qtbot):
    viewer, widget, _ = setup
    layer = next(lay for lay in viewer.layers if lay.metadata.get("dismm_kind") == "inspect_difference")
    low, high = layer.contrast_limits
    assert low == pytest.approx(-high) and high > 0
    raw = layer.metadata["raw"]
    assert raw.shape == (ROWS, COLS)
    assert raw[7 // COLS, 7 % COLS] > 0 and raw[20 // COLS, 20 % COLS] < 0

    tumor = widget.scatter.x
    # a rectangle around the high-tumor, low-TME points only
    _drag(widget.scatter, (tumor.max() * 0.7, 0.02), (tumor.max() * 1.02, 0.5))
    assert set(widget.points_layer.selected_data) == TUMOR_HOT
    assert set(widget.scatter.highlighted.tolist()) == TUMOR_HOT
    widths = np.asarray(widget.points_layer.border_width)
    assert set(np.flatnonzero(widths > 0).tolist()) == TUMOR_HOT  # drawn on the slide too
    # and back: selecting points on the slide highlights them in the scatter
    widget.points_layer.selected_data = TME_HOT
    assert set(widget.scatter.highlighted.tolist()) == TME_HOT


def test_gallery_click_moves_the_camera_to_the_patch(setup, qtbot, slide_path):
    viewer, widget, prediction = setup
    top = widget.gallery.buttons["top"]
    assert {b.property("patch_row") for b in top[:3]} == TUMOR_HOT
    assert len(widget.gallery.buttons["random"]) == widget.gallery_k.value()
    _camera(viewer).center = (0.0, 0.0)
    button = top[0]
    row = button.property("patch_row")
    qtbot.mouseClick(button, __import__("qtpy.QtCore", fromlist=["Qt"]).Qt.MouseButton.LeftButton)
    patch = prediction.patches.iloc[row]
    expected = ((patch.y + SIZE20 / 2 - 0.5) * MPP, (patch.x + SIZE20 / 2 - 0.5) * MPP)
    assert tuple(_camera(viewer).center[-2:]) == pytest.approx(expected)
    assert set(widget.points_layer.selected_data) == {row}
    # the thumbnail is the slide's patch (read at 20x from the pyramid): compare with a direct read
    from napari_dismm.viewer.inspect.layers import read_patch

    levels = list(viewer.layers[0].data)
    thumb = read_patch(levels, patch, slide_mpp=MPP, mag="20x", size=32)
    import tifffile

    level0 = tifffile.TiffFile(slide_path).pages[0].asarray()
    direct = level0[int(patch.y):int(patch.y) + SIZE20, int(patch.x):int(patch.x) + SIZE20, :3]
    from PIL import Image

    reference = np.asarray(Image.fromarray(direct).resize((32, 32), Image.Resampling.BILINEAR)).astype(float)
    assert np.abs(thumb.astype(float) - reference).mean() < 20


def test_teacher_comparison_and_cohort_context(setup, tmp_path):
    viewer, widget, prediction = setup
    teacher_patches = prediction.patches.copy()
    teacher_patches["tme_attention"] = teacher_patches["tme_attention"].to_numpy()[::-1]  # disagrees on TME
    teacher = make_prediction(prediction.slide_id, teacher_patches, model_kind="teacher")
    widget.teacher_bundle.setText(str(write_bundle(teacher, tmp_path / "teacher")))
    widget.teacher_button.click()
    text = widget.agreement_label.text()
    assert "tumor rho 1.00" in text and "TME rho" in text
    names = [layer.name for layer in viewer.layers]
    assert "teacher tumor attention 20x" in names and "student - teacher rank tme" in names

    fold = tmp_path / "run" / "student" / "fold_0"
    fold.mkdir(parents=True)
    rng = np.random.default_rng(0)
    risks = np.linspace(0.0, 1.0, 20)
    pd.DataFrame({"slide_id": [f"s{i}" for i in range(20)], "patient_id": [f"p{i}" for i in range(20)],
                  "time": rng.uniform(1, 30, 20), "event": rng.integers(0, 2, 20), "risk": risks}).to_csv(
        fold / "test_predictions.csv", index=False)
    widget.cohort_run.setText(str(tmp_path / "run"))
    widget.cohort_button.click()
    assert "risk: 90th percentile of 20 patients" in widget.cohort_label.text()
    assert len(widget.cohort_figure.axes[0].lines) >= 3  # two KM strata and the slide's S(t)

    # the figures tab shows what `dismm inspect` wrote
    out = tmp_path / "figures"
    out.mkdir()
    from napari_dismm.inspect.figures import plot_similarity

    plot_similarity({"teacher": {"20x": {"cka": [0.2], "cosine": [0.0]}}}, out / "similarity.png")
    summary = {"figures": ["similarity.png"], "models": {"teacher": {"similarity": {
        "20x": {"cka": {"mean": 0.2, "sd": 0.0, "folds": [0.2]}}}}}}
    (out / "summary.json").write_text(__import__("json").dumps(summary))
    widget.fig_out.setText(str(out))
    widget.fig_show.click()
    assert widget.fig_images.count() == 1 and "teacher: tumor-vs-TME CKA 20x 0.20" in widget.fig_label.text()


@pytest.mark.slow
def test_run_the_teacher_with_the_patients_expression(make_napari_viewer, slide_path, tmp_path, qtbot, monkeypatch):
    """Student (random init) predicted on the slide, then the widget runs a teacher with the
    patient's expression on the same slide and compares the two on their shared patches."""
    import torch

    from napari_dismm.model.checkpoint import save_model
    from napari_dismm.model.registry import build_model
    from napari_dismm.omics import ExpressionNormaliser, read_expression
    from napari_dismm.predict import predict_slide
    from napari_dismm.viewer.inspect.widget import InspectWidget

    monkeypatch.setenv("NAPARI_DISMM_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    genes_t, genes_e = ["TP53", "MYC"], ["CD3E", "CD8A", "PTPRC"]
    table = pd.DataFrame(np.random.default_rng(0).uniform(0, 50, (4, 5)), columns=genes_t + genes_e,
                         index=[f"P{i}" for i in range(4)])
    expression = tmp_path / "expr.tsv"
    table.rename_axis("patient").to_csv(expression, sep="\t")
    normaliser = ExpressionNormaliser(log1p=True).fit(read_expression(expression), {"tumor": genes_t, "tme": genes_e})
    common = {"task": "survival", "n_outputs": 4, "d_in": 1280, "d": 16, "magnifications": ("10x", "20x"), "n_heads": 2}
    extra = {"encoder": "efficientnet-lite0", "magnifications": ["10x", "20x"], "bin_edges": [0, 10, 20, 30, None]}
    torch.manual_seed(0)
    save_model(build_model({"kind": "student", **common}), tmp_path / "student", extra=extra)
    save_model(build_model({"kind": "teacher", **common, "n_tumor_genes": 2, "n_tme_genes": 3}), tmp_path / "teacher",
               extra={**extra, "normaliser": normaliser.to_dict()})
    student = predict_slide(slide_path=slide_path, model_dir=tmp_path / "student", device="cpu", batch_size=8)

    viewer = make_napari_viewer(show=True)
    viewer.open(str(slide_path), plugin="napari-dismm")
    widget = InspectWidget(viewer)
    widget.set_prediction(student)
    widget.teacher_model.setText(str(tmp_path / "teacher"))
    widget.teacher_expression.setText(str(expression))
    widget.teacher_patient.setText("P2")
    widget.teacher_button.click()
    qtbot.waitUntil(lambda: "Spearman" in widget.agreement_label.text(), timeout=120_000)
    assert widget.teacher_prediction.model_kind == "teacher"
    assert "20x: tumor rho" in widget.agreement_label.text()
    assert any(layer.name == "teacher tumor attention 20x" for layer in viewer.layers)
