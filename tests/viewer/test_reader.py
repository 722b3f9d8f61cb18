"""The napari reader without a viewer: what npe2.read returns is what the viewer shows."""

from pathlib import Path

import npe2
import numpy as np
import pytest

from napari_dismm.viewer.reader import napari_get_reader


@pytest.fixture(scope="module")
def plugin_manager():
    pm = npe2.PluginManager.instance()
    pm.discover()
    return pm


def test_manifest_is_valid_and_discovered(plugin_manager):
    manifest = plugin_manager.get_manifest("napari-dismm")
    assert manifest.contributions.readers
    assert manifest.contributions.sample_data[0].key == "sample-slide"


def test_npe2_read_real_slide(plugin_manager, cmu_slide_path):
    layers = npe2.read([str(cmu_slide_path)], plugin_name="napari-dismm", stack=False)
    assert len(layers) == 1
    data, kwargs, layer_type = layers[0]
    assert layer_type == "image"
    assert kwargs["multiscale"] and kwargs["rgb"]
    assert kwargs["scale"] == pytest.approx((0.499, 0.499))
    assert kwargs["units"] == ("um", "um")
    assert data[0].shape == (2967, 2220, 3)
    # the layer data is lazy but real: a region equals the slide's own pixels
    import openslide

    ref = np.asarray(openslide.OpenSlide(str(cmu_slide_path)).read_region((1000, 2000), 0, (300, 200)).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(data[0][2000:2200, 1000:1300]), ref)


@pytest.mark.parametrize("name", ["notes.txt", "image.png"])
def test_reader_declines_non_slides(tmp_path: Path, name: str):
    path = tmp_path / name
    path.write_bytes(b"not a slide")
    assert napari_get_reader(str(path)) is None


def test_reader_declines_missing_and_empty_directory(tmp_path: Path):
    assert napari_get_reader(str(tmp_path / "missing.svs")) is None
    assert napari_get_reader(str(tmp_path)) is None


def test_npe2_validate_passes():
    import subprocess

    result = subprocess.run(["npe2", "validate", "napari-dismm"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout.lower()
