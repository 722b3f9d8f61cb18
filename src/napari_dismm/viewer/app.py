"""Starting napari for the command line: a window, or a virtual screen for headless runs.

napari needs OpenGL, which offscreen Qt does not have; headless runs therefore draw on an
X virtual framebuffer (Xvfb) when no display is present.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from napari_dismm.errors import DismmError
from napari_dismm.slide import Slide


#: napari's own (experimental) switch: build the controls panel of a layer when it is
#: selected instead of one panel per layer when it is added
DYNAMIC_LAYER_CONTROLS_ENV = "NAPARI_EXPERIMENTAL_DYNAMIC_LAYER_CONTROLS"


def prefer_dynamic_layer_controls() -> None:
    """For the viewers `dismm view` and `dismm demo` open: ask napari for dynamic layer controls.

    Why: napari builds a Qt controls panel for every layer as it is added (about 0.05 s
    each, the largest share of adding the six overlay layers); with this switch it builds
    one for the selected layer only. It goes through napari's environment override, so the
    user's settings file is never written, a user who set the variable keeps their choice,
    and a process whose napari has already read its settings is left as it is."""
    os.environ.setdefault(DYNAMIC_LAYER_CONTROLS_ENV, "1")


def display_available() -> bool:
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def require_display() -> None:
    if not display_available():
        raise DismmError(
            "no display found: run under `xvfb-run -a`, or use `dismm demo --headless --out DIR`"
        )


@contextlib.contextmanager
def virtual_display(size: tuple[int, int] = (1280, 960)) -> Iterator[None]:
    """Use the real display when there is one, else a private Xvfb for the duration."""
    if display_available():
        yield
        return
    try:
        from pyvirtualdisplay import Display
    except ImportError as error:  # pragma: no cover - depends on the install
        raise DismmError("no display and pyvirtualdisplay is missing: pip install pyvirtualdisplay") from error
    try:
        display = Display(visible=False, size=size)
        display.start()
    except Exception as error:  # the Xvfb binary is missing or failed to start
        raise DismmError(f"no display and Xvfb could not start ({error}); install the xvfb package") from error
    try:
        yield
    finally:
        display.stop()


def new_viewer(*, show: bool = True, title: str = "napari-dismm", scale_bar: bool = True):
    """``scale_bar=False`` leaves it to the caller (`show_slide` turns it on after the first
    frame: rendering its text the first time costs ~0.05-0.08 s of the window's start)."""
    import napari

    viewer = napari.Viewer(title=title, show=show)
    viewer.scale_bar.visible = scale_bar
    return viewer


def add_slide(viewer, slide: Slide):
    """Add the slide's layers and frame the whole slide."""
    from napari_dismm.viewer.layers.slide import slide_layer_data

    data, kwargs, _ = slide_layer_data(slide)
    layer = viewer.add_image(data, **kwargs)  # layer units (µm) drive the scale bar
    viewer.reset_view()
    return layer


def dock_prediction_widget(viewer):
    """The prediction widget, docked on the right, ready to run on the open slide."""
    from napari_dismm.viewer.widget import PredictionWidget

    widget = PredictionWidget(viewer)
    viewer.window.add_dock_widget(widget, name="DisMM prediction", area="right")
    return widget


def add_bundle(widget, slide: Slide, bundle: Path) -> None:
    """Show a prediction bundle over its slide (layers and panel); another slide's is refused."""
    from napari_dismm.bundle import check_bundle_matches_slide, read_bundle

    prediction = read_bundle(bundle)
    check_bundle_matches_slide(prediction, slide.info)
    widget.show_prediction(prediction)


def show_slide(slide: Slide, *, bundle: Path | None = None, prediction=None,
               exit_after_first_frame: bool = False) -> None:
    """Open a window with the slide (and a bundle's or a prediction's layers) and run the
    event loop until it is closed."""
    import napari

    viewer = new_viewer(show=True, scale_bar=False)
    add_slide(viewer, slide)
    # the slide's first frame comes first; the scale bar (its text's first render) right after
    after_first_frame(viewer, lambda: setattr(viewer.scale_bar, "visible", True))
    if bundle is None and prediction is None:
        # nothing for the widget to show yet: the dock comes after the first frame too
        # (importing the widget, with pandas and matplotlib's Qt canvas, took ~1.3-1.7 s,
        # the whole gap between `dismm view` and napari's own first frame)
        after_first_frame(viewer, lambda: _dock_if_open(viewer))
    else:
        widget = dock_prediction_widget(viewer)
        if bundle is not None:
            add_bundle(widget, slide, bundle)
        if prediction is not None:
            widget.show_prediction(prediction)
    if exit_after_first_frame:
        _quit_after_first_frame(viewer)
    napari.run()


def _dock_if_open(viewer) -> None:
    """Dock the widget unless the window was closed meanwhile (``--first-frame`` closes it)."""
    if getattr(viewer.window, "_qt_window", None) is not None:
        dock_prediction_widget(viewer)


def after_first_frame(viewer, action) -> None:
    """Run ``action()`` once, from the event loop, just after the canvas draws its first frame."""
    from qtpy.QtCore import QTimer

    canvas = viewer.window._qt_viewer.canvas._scene_canvas  # vispy SceneCanvas (private)

    def on_draw(event) -> None:
        canvas.events.draw.disconnect(on_draw)
        QTimer.singleShot(0, action)

    canvas.events.draw.connect(on_draw)


def _quit_after_first_frame(viewer) -> None:
    """For the benchmark: print seconds from process start to the first drawn frame, then quit."""
    import psutil
    from qtpy.QtCore import QTimer

    canvas = viewer.window._qt_viewer.canvas._scene_canvas  # vispy SceneCanvas (private, benchmark only)
    started = psutil.Process().create_time()

    def on_draw(event) -> None:
        canvas.events.draw.disconnect(on_draw)
        print(f"first-frame-seconds {time.time() - started:.3f}", flush=True)
        QTimer.singleShot(0, viewer.close)

    canvas.events.draw.connect(on_draw)


def headless_screenshot(slide: Slide, *, out_dir: Path, prediction=None) -> Path:
    """Render the slide (and a prediction's overlays) in a shown virtual-screen viewer and
    save a PNG of the canvas."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with virtual_display():
        viewer = new_viewer(show=True)
        try:
            add_slide(viewer, slide)
            if prediction is not None:
                from napari_dismm.viewer.layers.display import add_prediction_layers

                add_prediction_layers(viewer, prediction)
                viewer.reset_view()
            image = viewer.screenshot(canvas_only=True, flash=False)
        finally:
            viewer.close()
    from skimage.io import imsave

    path = out_dir / "screenshot.png"
    tmp = out_dir / ".screenshot.png.tmp.png"
    imsave(tmp, image, check_contrast=False)
    tmp.replace(path)
    return path
