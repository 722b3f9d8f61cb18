"""A prediction bundle on disk -> the same layer tuples the widget adds (no viewer needed)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_dismm.bundle import BundleError, write_bundle
from napari_dismm.errors import DismmError
from napari_dismm.predict import BundleMismatchError
from napari_dismm.viewer.bundle_reader import is_bundle, read_bundle_layers
from napari_dismm.viewer.layers.prediction import prediction_layer_data
from tests.viewer.test_prediction_layers import make_prediction, patch_table

ROWS = [{"x": 448 * i, "y": 448 * j, "width": 448, "height": 448, "tumor_attention": (i + 1) * (j + 1),
         "tme_attention": 1.0, "ita_cluster": (i + j) % 2, "ita_centre": i == j == 0}
        for i in range(4) for j in range(3)]


@pytest.fixture
def bundle(tmp_path):
    pred = make_prediction(patch_table(ROWS), slide_id="dismm-sha256:slide-a",
                           contours=[[(0, 0), (1800, 0), (1800, 1400), (0, 1400)]])
    return pred, write_bundle(pred, tmp_path / "bundle")


def test_bundle_layers_equal_the_widget_layers(bundle):
    pred, path = bundle
    assert is_bundle(path) and not is_bundle(path / "patches.csv")
    from_disk = read_bundle_layers(path, normalisation="minmax")
    direct = prediction_layer_data(pred, normalisation="minmax")
    assert [kw["name"] for _, kw, _ in from_disk] == [kw["name"] for _, kw, _ in direct]
    for (a, ka, ta), (b, kb, tb) in zip(from_disk, direct):
        assert ta == tb and ka.get("scale") == kb.get("scale") and ka.get("translate") == kb.get("translate")
        if ta != "shapes":
            np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-6)
        assert ka["metadata"]["bundle_path"] == str(path)
        assert ka["metadata"]["dismm_prediction"].slide_id == pred.slide_id


def test_bundle_of_another_slide_is_refused(bundle):
    _, path = bundle
    with pytest.raises(BundleMismatchError) as error:
        read_bundle_layers(path, slide_id="dismm-sha256:slide-b")
    assert "bundle is for slide dismm-sha256:slide-a" in str(error.value) and "slide-b" in str(error.value)
    assert read_bundle_layers(path, slide_id="dismm-sha256:slide-a")


def test_malformed_bundle_is_a_clear_error(bundle):
    _, path = bundle
    (path / "patches.csv").write_text("x,y\n1,2\n")
    with pytest.raises(BundleError, match="patches.csv"):
        read_bundle_layers(path)
    with pytest.raises(DismmError, match="not a prediction bundle"):
        read_bundle_layers(path / "nothing-here")
