"""A real napari viewer under Xvfb (pytest-xvfb): open slides, look at the screenshot."""

import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _tissue_fraction(image: np.ndarray) -> float:
    """Fraction of screenshot pixels that look like stained tissue (not white, not black)."""
    rgb = image[..., :3].astype(float)
    saturation = rgb.max(-1) - rgb.min(-1)
    return float(((saturation > 25) & (rgb.mean(-1) > 30)).mean())


def test_open_real_slide_shows_tissue(make_napari_viewer, cmu_slide_path):
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(str(cmu_slide_path), plugin="napari-dismm")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.multiscale and layer.rgb
    np.testing.assert_allclose(layer.scale, (0.499, 0.499))
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.std() > 10, "screenshot is blank"
    assert _tissue_fraction(shot) > 0.1
    white = (shot[..., :3].min(-1) > 220).mean()
    assert white > 0.2, "slide background should render white, not black or transparent"


def test_sample_data_contribution(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-dismm", "sample-slide")
    layer = viewer.layers[-1]
    assert layer.multiscale and len(layer.data) >= 3
    assert layer.metadata["dismm_kind"] == "slide"
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert _tissue_fraction(shot) > 0.05


def test_bad_file_does_not_crash_viewer(make_napari_viewer, tmp_path, cmu_slide_path):
    viewer = make_napari_viewer(show=True)
    broken = tmp_path / "broken.svs"
    broken.write_bytes(cmu_slide_path.read_bytes()[:100_000])
    with pytest.raises(Exception) as info:
        viewer.open(str(broken), plugin="napari-dismm")
    assert "broken.svs" in str(info.value)
    viewer.open(str(cmu_slide_path), plugin="napari-dismm")
    assert len(viewer.layers) == 1


def test_view_command_renders_first_frame(cmu_slide_path):
    result = subprocess.run(
        [sys.executable, "-m", "napari_dismm.cli", "view", str(cmu_slide_path), "--first-frame"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "first-frame-seconds" in result.stdout


def test_demo_headless_writes_screenshot(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "napari_dismm.cli", "demo", "--headless", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    from skimage.io import imread

    shot = imread(out / "screenshot.png")
    assert _tissue_fraction(shot) > 0.05
    from napari_dismm.bundle import read_bundle

    prediction = read_bundle(out / "bundle")
    assert prediction.model_kind == "student" and len(prediction.patches) > 50
    assert "predicts" in result.stdout


def test_view_command_with_bundle_and_mismatch(tmp_path, cmu_slide_path):
    """`dismm view SLIDE BUNDLE` shows a bundle of that slide and refuses another slide's."""
    from napari_dismm.model.checkpoint import save_model
    from napari_dismm.model.registry import build_model
    from napari_dismm.model.student import StudentConfig
    from napari_dismm.predict import predict_slide
    from napari_dismm.slide.synthetic import write_sample_slide

    model = build_model(StudentConfig(task="classification", n_outputs=2, d_in=1280, d=32, magnifications=("10x",)))
    save_model(model, tmp_path / "model", extra={"encoder": "efficientnet-lite0", "magnifications": ["10x"],
                                                  "class_names": ["a", "b"], "patch_size": 224})
    predict_slide(slide_path=cmu_slide_path, model_dir=tmp_path / "model", out_dir=tmp_path / "bundle",
                  features_dir=tmp_path / "features", device="cpu")
    ok = subprocess.run([sys.executable, "-m", "napari_dismm.cli", "view", str(cmu_slide_path),
                         str(tmp_path / "bundle"), "--first-frame"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    other = write_sample_slide(tmp_path / "other.tif", width=1200, height=900, seed=3)
    bad = subprocess.run([sys.executable, "-m", "napari_dismm.cli", "view", str(other.path), str(tmp_path / "bundle")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "bundle is for slide" in bad.stderr and "Traceback" not in bad.stderr


_DYNAMIC_CONTROLS_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from napari_dismm.viewer.app import new_viewer, prefer_dynamic_layer_controls
prefer_dynamic_layer_controls()  # as `dismm view` / `dismm demo` do, before napari reads its settings
from napari.settings import get_settings
from qtpy.QtWidgets import QApplication
from napari_dismm.viewer.layers.display import add_prediction_layers
from tests.viewer.test_prediction_layers import make_prediction, patch_table
viewer = new_viewer(show=True)
print("dynamic", get_settings().experimental.dynamic_layer_controls)
pred = make_prediction(patch_table([
    {{"x": 0, "y": 0, "width": 448, "height": 448, "tumor_attention": 1.0, "ita_cluster": 0, "ita_centre": True}},
    {{"x": 448, "y": 0, "width": 448, "height": 448, "tumor_attention": 0.5, "ita_cluster": 1}},
]), contours=[[(0, 0), (896, 0), (896, 448), (0, 448)]])
layers = add_prediction_layers(viewer, pred)
controls = viewer.window._qt_viewer.controls
for layer in layers:
    viewer.layers.selection.active = layer
    QApplication.processEvents()
    panel = controls.currentWidget()
    print("controls", layer.name, type(panel).__name__, panel.isVisible())
for layer in list(viewer.layers):
    viewer.layers.remove(layer)
QApplication.processEvents()
print("removed", len(viewer.layers))
viewer.close()
"""


@pytest.mark.parametrize("preset", [None, "0"])
def test_dismm_viewers_build_layer_controls_on_selection(preset):
    """`dismm view` / `dismm demo` ask napari (through its environment override, never the
    settings file) for controls built on selection; every overlay layer still gets a shown
    controls panel and removing them is clean. A user's own setting of the variable wins."""
    import os
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "NAPARI_EXPERIMENTAL_DYNAMIC_LAYER_CONTROLS"}
    if preset is not None:
        env["NAPARI_EXPERIMENTAL_DYNAMIC_LAYER_CONTROLS"] = preset
    root = str(Path(__file__).resolve().parents[2])
    result = subprocess.run([sys.executable, "-c", _DYNAMIC_CONTROLS_SCRIPT.format(root=root)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"dynamic {preset is None}" in lines
    panels = [line.split() for line in lines if line.startswith("controls")]
    assert len(panels) == 6 and all(words[-1] == "True" for words in panels)
    expected = "QtDynamicLayerControls" if preset is None else None
    if expected:
        assert all(words[-2] == expected for words in panels)
    assert "removed 0" in lines
