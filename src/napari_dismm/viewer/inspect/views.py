"""Qt views of the subspace comparison: a brushable tumor-vs-TME scatter and a gallery.

Both know nothing of napari: they report what the user did through callbacks
(``on_brush(indices)``, ``on_click(row)``) and are told what to highlight, so the
widget (:mod:`napari_dismm.viewer.inspect.widget`) links them to the slide.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.widgets import RectangleSelector
from qtpy.QtCore import QSize, Qt
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import QGridLayout, QLabel, QToolButton, QVBoxLayout, QWidget

BASE_COLOUR = (0.55, 0.55, 0.55, 0.5)
HIGHLIGHT_COLOUR = (1.0, 0.55, 0.0, 1.0)


class SubspaceScatter(QWidget):
    """Per-patch tumor vs TME relative attention; drag a rectangle to brush patches."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.figure = Figure(figsize=(3.4, 3.0), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)
        self.ax = self.figure.add_subplot()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.x = np.zeros(0)
        self.y = np.zeros(0)
        self.points = None
        self.highlighted = np.zeros(0, dtype=np.int64)
        self.on_brush: Callable[[np.ndarray], None] | None = None
        self.selector = None

    def set_data(self, x: np.ndarray, y: np.ndarray, *, title: str = "") -> None:
        self.x, self.y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        self.ax.clear()
        self.points = self.ax.scatter(self.x, self.y, s=14, c=[BASE_COLOUR] * len(self.x), linewidths=0)
        top = float(max(self.x.max(initial=1), self.y.max(initial=1))) * 1.05
        self.ax.plot([0, top], [0, top], color="grey", lw=0.7, ls="--")
        pad = 0.03 * top  # points at 0 (a patch one subspace ignores) stay off the axes' spines
        self.ax.set_xlim(-pad, top)
        self.ax.set_ylim(-pad, top)
        self.ax.set_xlabel("tumor attention (x patches)", fontsize=8)
        self.ax.set_ylabel("TME attention (x patches)", fontsize=8)
        self.ax.tick_params(labelsize=7)
        self.ax.set_title(title or "drag to select patches", fontsize=8)
        self.selector = RectangleSelector(self.ax, self._on_select, useblit=False, button=[1], minspanx=0,
                                          minspany=0, spancoords="data", interactive=False)
        self.highlighted = np.zeros(0, dtype=np.int64)
        self.canvas.draw()

    def _on_select(self, press, release) -> None:
        self.brush(press.xdata, release.xdata, press.ydata, release.ydata)

    def brush(self, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
        """Select the points inside the rectangle (data coordinates); returns their indices."""
        (xa, xb), (ya, yb) = sorted((x0, x1)), sorted((y0, y1))
        inside = np.flatnonzero((self.x >= xa) & (self.x <= xb) & (self.y >= ya) & (self.y <= yb))
        self.highlight(inside)
        if self.on_brush is not None:
            self.on_brush(inside)
        return inside

    def highlight(self, indices: Sequence[int]) -> None:
        """Colour these points (e.g. the patches selected on the slide)."""
        self.highlighted = np.asarray(sorted(int(i) for i in indices), dtype=np.int64)
        if self.points is None:
            return
        colours = np.tile(BASE_COLOUR, (len(self.x), 1))
        colours[self.highlighted] = HIGHLIGHT_COLOUR
        self.points.set_facecolors(colours)
        self.points.set_sizes(np.where(np.isin(np.arange(len(self.x)), self.highlighted), 28, 14))
        self.canvas.draw_idle()

    def display_xy(self, x: float, y: float) -> tuple[float, float]:
        """Canvas pixel position of a data point (for driving the brush with mouse events)."""
        return tuple(self.ax.transData.transform((x, y)))


class PatchGallery(QWidget):
    """Rows of thumbnails (e.g. top / bottom / random); a click reports the patch row."""

    def __init__(self, parent: QWidget | None = None, *, thumb: int = 80) -> None:
        super().__init__(parent)
        self.thumb = thumb
        self.grid = QGridLayout(self)
        self.grid.setContentsMargins(0, 0, 0, 0)
        self.grid.setSpacing(2)
        self.buttons: dict[str, list[QToolButton]] = {}
        self.on_click: Callable[[int], None] | None = None

    def clear(self) -> None:
        while self.grid.count():
            item = self.grid.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        self.buttons = {}

    def set_sections(self, sections: dict[str, list[tuple[int, np.ndarray, str]]]) -> None:
        """``{section: [(row, (h, w, 3) uint8 image, tooltip), ...]}``, one gallery row each."""
        self.clear()
        for r, (name, items) in enumerate(sections.items()):
            label = QLabel(name)
            label.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.grid.addWidget(label, r, 0)
            self.buttons[name] = []
            for c, (row, image, tip) in enumerate(items):
                button = QToolButton()
                button.setIcon(QIcon(QPixmap.fromImage(_qimage(image))))
                button.setIconSize(QSize(self.thumb, self.thumb))
                button.setToolTip(tip)
                button.setProperty("patch_row", int(row))
                button.clicked.connect(lambda _checked=False, row=int(row): self._clicked(row))
                self.grid.addWidget(button, r, c + 1)
                self.buttons[name].append(button)

    def _clicked(self, row: int) -> None:
        if self.on_click is not None:
            self.on_click(row)


def _qimage(image: np.ndarray) -> QImage:
    data = np.ascontiguousarray(image[..., :3].astype(np.uint8))
    h, w = data.shape[:2]
    qimage = QImage(data.data, w, h, 3 * w, QImage.Format.Format_RGB888)
    return qimage.copy()  # own the pixels: ``data`` is freed when this returns
