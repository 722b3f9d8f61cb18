"""What `dismm view` pays before its first frame: neither torch nor zarr is imported by the
reader, the view command or the docked widget (torch loads when a prediction runs), and a
prediction started after napari's OpenGL is up does not crash the process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gui

HEAVY = ("torch", "torchvision", "triton", "timm", "zarr")

_VIEW_SCRIPT = textwrap.dedent(
    """
    import json, sys
    path = sys.argv[1]
    seen = {}
    from napari_dismm.viewer.reader import napari_get_reader
    layers = napari_get_reader(path)(path)
    assert layers and layers[0][2] == "image"
    seen["reader"] = sorted(m for m in HEAVY if m in sys.modules)
    from napari_dismm.cli import main
    assert main(["view", path, "--first-frame"]) == 0
    seen["view"] = sorted(m for m in HEAVY if m in sys.modules)
    import napari
    from qtpy.QtWidgets import QApplication
    from napari_dismm.viewer.app import dock_prediction_widget
    viewer = napari.Viewer(show=True)
    viewer.open(path, plugin="napari-dismm")
    widget = dock_prediction_widget(viewer)
    QApplication.processEvents()
    assert widget.slide.value is not None
    seen["widget"] = sorted(m for m in HEAVY if m in sys.modules)
    viewer.close()
    print("SEEN " + json.dumps(seen))
    """
)


def test_view_reader_and_widget_import_no_torch_nor_zarr(cmu_slide_path):
    script = f"HEAVY = {HEAVY!r}\n" + _VIEW_SCRIPT
    result = subprocess.run([sys.executable, "-c", script, str(cmu_slide_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "first-frame-seconds" in result.stdout
    line = next(line for line in result.stdout.splitlines() if line.startswith("SEEN "))
    assert json.loads(line[5:]) == {"reader": [], "view": [], "widget": []}


_TRITON_SCRIPT = textwrap.dedent(
    """
    import numpy as np, napari
    from qtpy.QtWidgets import QApplication
    from napari_dismm.viewer.triton_guard import keep_triton_out_if_llvm_loaded, llvm_mapped
    viewer = napari.Viewer(show=True)
    viewer.add_image(np.zeros((32, 32, 3), np.uint8), rgb=True)
    QApplication.processEvents()
    print("llvm", llvm_mapped(), "guarded", keep_triton_out_if_llvm_loaded(), flush=True)
    import torch, torchvision  # torchvision makes torch._dynamo look for triton
    print("imported", torch.__version__, flush=True)
    viewer.close()
    """
)


def test_torch_imports_after_the_canvas_is_up():
    """Under Xvfb, Mesa's llvmpipe maps libLLVM; a triton import after it segfaulted (-11)."""
    result = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-1500:]}"
    assert "imported" in result.stdout
    if "llvm True" not in result.stdout:
        pytest.skip("no libLLVM in this process (hardware OpenGL): nothing to guard against")
    assert "guarded True" in result.stdout


_AFTER_FIRST_FRAME_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import napari
    from napari.qt import get_qapp
    from qtpy.QtCore import QTimer
    from napari_dismm.slide import open_slide
    from napari_dismm.viewer.app import show_slide
    get_qapp()
    started = time.time()
    def poll():
        viewer = napari.current_viewer()
        docked = viewer is not None and "DisMM prediction" in viewer.window._dock_widgets
        if docked or time.time() - started > 120:
            print("SEEN " + json.dumps({"docked": docked, "scale_bar": bool(viewer and viewer.scale_bar.visible)}))
            if viewer is not None:
                viewer.close()
            return
        QTimer.singleShot(100, poll)
    QTimer.singleShot(100, poll)
    show_slide(open_slide(sys.argv[1]))
    """
)


def test_scale_bar_and_widget_arrive_after_the_first_frame(cmu_slide_path):
    """`dismm view` draws the slide first; the scale bar and the docked widget follow."""
    result = subprocess.run([sys.executable, "-c", _AFTER_FIRST_FRAME_SCRIPT, str(cmu_slide_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("SEEN "))
    assert json.loads(line[5:]) == {"docked": True, "scale_bar": True}
