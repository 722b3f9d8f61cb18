"""Figures: each writes a real PNG with drawn content, headless."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from napari_dismm.errors import DataError
from training.plots import plot_km, plot_roc, plot_training_curves


def _check_png(path) -> np.ndarray:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = np.asarray(Image.open(path).convert("L"))
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert (image < 128).mean() > 0.005  # lines and text were drawn, not a blank canvas
    return image


def test_roc_multiclass_and_binary(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    probs = rng.dirichlet(np.ones(3), 40) + np.eye(3)[y]
    probs /= probs.sum(1, keepdims=True)
    _check_png(plot_roc(y_true=y, probs=probs, class_names=["a", "b", "c"], path=tmp_path / "roc.png"))
    yb = np.array([0, 1, 0, 1, 1])
    pb = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6], [0.1, 0.9]])
    _check_png(plot_roc(y_true=yb, probs=pb, class_names=["lo", "hi"], path=tmp_path / "sub" / "roc2.png"))
    with pytest.raises(DataError, match="probs must be"):
        plot_roc(y_true=yb, probs=pb, class_names=["a", "b", "c"], path=tmp_path / "x.png")


def test_km_and_training_curves(tmp_path):
    rng = np.random.default_rng(1)
    risk = rng.standard_normal(30)
    times = rng.exponential(10 * np.exp(-risk))
    events = (rng.random(30) < 0.8).astype(int)
    _check_png(plot_km(times=times, events=events, risks=risk, path=tmp_path / "km.png"))
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_auc": 0.5 + e / 20} for e in range(1, 8)]
    _check_png(plot_training_curves(history=history, path=tmp_path / "curves.png"))
    with pytest.raises(DataError, match="no epoch"):
        plot_training_curves(history=[], path=tmp_path / "none.png")
