"""The prediction panel: what the model said about the slide, and what it was trained for.

Class probabilities as a bar chart, or the risk with its survival curve (matplotlib in Qt),
plus the model id and the standing note that attention is not evidence. Kept apart from
the widget so it can be shown for a bundle opened without running anything.
"""

from __future__ import annotations

import math

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget

from napari_dismm.viewer.layers.prediction import NOTE


class PredictionPanel(QWidget):
    """A small figure and text for one `Prediction` (empty until `show_prediction`)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.figure = Figure(figsize=(3.2, 2.2), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(170)
        self.summary = QLabel("no prediction yet")
        self.summary.setWordWrap(True)
        self.note = QLabel(NOTE)
        self.note.setWordWrap(True)
        self.note.setStyleSheet("font-style: italic; color: #e0a040;")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for widget in (self.summary, self.canvas, self.note):
            layout.addWidget(widget)
        self.prediction = None

    def show_prediction(self, prediction) -> None:
        self.prediction = prediction
        self.summary.setText(summary_text(prediction))
        self.figure.clear()
        ax = self.figure.add_subplot()
        if prediction.task == "survival":
            plot_survival(ax, prediction)
        else:
            plot_probabilities(ax, prediction)
        self.canvas.draw_idle()

    def clear(self) -> None:
        self.prediction = None
        self.summary.setText("no prediction yet")
        self.figure.clear()
        self.canvas.draw_idle()


def summary_text(prediction) -> str:
    lines = [f"<b>{prediction.slide_name}</b>", f"model {prediction.model_id or '?'} ({prediction.model_kind})",
             f"trained for: {prediction.trained_for or 'not recorded'}"]
    if prediction.task == "survival" and prediction.risk is not None:
        lines.append(f"risk {prediction.risk:.3f} (higher = shorter expected survival)")
    elif prediction.predicted_class is not None:
        lines.append(f"predicted: <b>{prediction.predicted_class}</b>")
    from napari_dismm.fine_maps import scope_text

    scope = scope_text(getattr(prediction, "scope", None) or {})
    if scope:
        lines.append(f"<i>{scope}</i>")
    return "<br>".join(lines)


def plot_probabilities(ax, prediction):
    names = list(prediction.class_names)
    probs = list(prediction.probabilities or [0.0] * len(names))
    colours = ["tab:orange" if n == prediction.predicted_class else "tab:blue" for n in names]
    ax.barh(range(len(names)), probs, color=colours)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    return ax


def plot_survival(ax, prediction):
    """S(t) as a step curve over the bins; an open last bin is drawn half a bin wide."""
    surv = [1.0, *[float(s) for s in prediction.survival or []]]
    edges = list(prediction.bin_edges or [])
    if len(edges) == len(surv):
        finite = [e for e in edges if e is not None and math.isfinite(e)]
        if edges[-1] is None or not math.isfinite(edges[-1]):
            width = (finite[-1] - finite[0]) / max(len(finite) - 1, 1) if len(finite) > 1 else 1.0
            edges = [*finite, finite[-1] + width / 2]
        times = [float(e) for e in edges]
        ax.set_xlabel("time")
    else:  # no usable edges: plot against the bin index
        times = list(range(len(surv)))
        ax.set_xlabel("time bin")
    ax.step(times, surv, where="post", color="tab:red")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("S(t)")
    ax.set_title(f"risk {prediction.risk:.3f}" if prediction.risk is not None else "survival", fontsize=9)
    return ax
