"""The shipped demo student: small, self-describing, and its tumor attention falls on the
planted tumor regions of the default sample slide (what `dismm demo` shows)."""

from __future__ import annotations

import json

import pytest

from napari_dismm.predict import DEMO_MODEL_DIR
from training.synth.layout import CLASS_NAMES
from training.recipes.demo_model import TRAINED_FOR, attention_auroc, demo_config, sample_slide_features

pytestmark = pytest.mark.skipif(
    not (DEMO_MODEL_DIR / "model.safetensors").exists(),
    reason="demo model not installed (python -m training.recipes.demo_model --install)",
)


def test_demo_model_is_small_and_self_describing():
    from napari_dismm.model.checkpoint import load_model

    assert (DEMO_MODEL_DIR / "model.safetensors").stat().st_size < 2 * 1024**2
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert config["encoder"] == "efficientnet-lite0"
    assert config["magnifications"] == ["10x", "20x"]
    assert config["patch_size"] == 224
    assert config["trained_for"] == TRAINED_FOR
    assert sorted(config["class_names"]) == sorted(CLASS_NAMES)  # the cohort loader's (sorted) order
    model, _ = load_model(DEMO_MODEL_DIR)
    assert type(model).__name__ == "Student"


def test_demo_config_is_valid_and_overridable():
    cfg = demo_config({"teacher": {"epochs": 3}})
    assert cfg.teacher.epochs == 3 and cfg.cv.folds == 3 and cfg.baselines.run == ()


@pytest.mark.slow
def test_demo_tumor_attention_finds_planted_tumor(tmp_path, monkeypatch):
    """AUROC of the student's tumor attention against the planted tumor mask (a patch is
    tumor when its centre lies in a tumor region) on the default sample slide, both
    magnifications pooled (each map scaled to its maximum) and each alone."""
    features, tumor = sample_slide_features(tmp_path / "features", threads=2)
    assert all(t.sum() >= 3 and (~t).sum() >= 3 for t in tumor.values())
    scores = attention_auroc(DEMO_MODEL_DIR, features=features, tumor=tumor)
    assert scores["all"] >= 0.9, scores
