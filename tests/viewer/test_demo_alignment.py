"""The main job's promise: with the shipped demo model on the generated sample slide, the
tumor-attention layer's high values fall on the planted tumor regions in world coordinates."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from napari_dismm.predict import predict_slide
from napari_dismm.slide import open_slide
from napari_dismm.slide.synthetic import load_sample_slide, sample_slide_path
from napari_dismm.viewer.layers.slide import slide_layer_data
from napari_dismm.viewer.layers.prediction import prediction_layer_data
from tests.viewer.test_prediction_layers import _by_name, _layer


@pytest.fixture(scope="module")
def demo_prediction(tmp_path_factory):
    path = sample_slide_path()
    features = tmp_path_factory.mktemp("demo_features")
    return load_sample_slide(path), open_slide(path), predict_slide(
        slide_path=path, model_dir="demo", features_dir=features, device="cpu")


@pytest.mark.slow
def test_demo_tumor_layer_falls_on_planted_tumor_in_world(demo_prediction):
    sample, slide, prediction = demo_prediction
    layers = _by_name(prediction_layer_data(prediction, normalisation="raw"))
    attention = _layer(layers["tumor attention 20x"])
    slide_layer = _layer(slide_layer_data(slide))
    width, height = slide.info.level_dimensions[0]
    rng = np.random.default_rng(0)
    world = rng.uniform(0, 1, (8000, 2)) * np.array([height, width]) * slide.info.mpp   # (y, x) µm
    pixel = np.rint(np.array([slide_layer.world_to_data(p) for p in world])).astype(int)
    truth = sample.labels_at(pixel[:, 1] + 0.5, pixel[:, 0] + 0.5) == 1                  # planted tumor
    cell = np.floor(np.array([attention.world_to_data(p) for p in world]) + 0.5).astype(int)
    grid = attention.data
    inside = (cell >= 0).all(1) & (cell[:, 0] < grid.shape[0]) & (cell[:, 1] < grid.shape[1])
    values = np.full(len(world), np.nan)
    values[inside] = grid[cell[inside, 0], cell[inside, 1]]
    known = np.isfinite(values)
    assert truth[known].any() and (~truth[known]).any()
    auroc = roc_auc_score(truth[known], values[known])
    print(f"\ndemo model, tumor attention 20x vs planted tumor in world coordinates: AUROC {auroc:.3f}")
    assert auroc >= 0.9
