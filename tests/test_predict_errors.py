"""Bad input to prediction: each is one clear line naming what is wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_dismm import predict
from napari_dismm.errors import DismmError, FeatureFileError, ModelConfigError, SlideError
from napari_dismm.features.h5 import FeatureFile, write_features
from napari_dismm.predict import (
    BundleMismatchError,
    check_bundle_matches_slide,
    predict_features,
    predict_slide,
    resolve_model_dir,
)
from tests.test_bundle import make_prediction
from tests.test_predict import EXTRA, save_random


def fake_features(path: Path, *, dim: int = 1280, encoder: str = "efficientnet-lite0", slide_id: str = "abc",
                  mag: float = 20.0, n: int = 30, weights_hash: str | None = None) -> Path:
    rng = np.random.default_rng(0)
    coords = np.stack(np.meshgrid(np.arange(6) * 448, np.arange(5) * 448), -1).reshape(-1, 2)[:n]
    write_features(path, FeatureFile(
        features=rng.standard_normal((len(coords), dim)).astype(np.float32), coords=coords.astype(np.int64),
        patch_size=224, patch_size_level0=448, target_magnification=mag, level0_magnification=40.0,
        name="fake", level0_width=3000, level0_height=2500, mpp=0.25, encoder=encoder, slide_id=slide_id,
        encoder_weights_hash=weights_hash,
    ))
    return path


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and isinstance(error.value, DismmError)
    return text


def test_model_for_other_feature_dimension_is_refused_before_reading(tmp_path: Path) -> None:
    model = save_random(tmp_path / "m", d_in=1024)
    slide = tmp_path / "not-even-read.tif"
    with pytest.raises(ModelConfigError) as error:
        predict_slide(slide_path=slide, model_dir=model, device="cpu", features_dir=tmp_path / "f")
    assert "model expects efficientnet-lite0 features (1024-d) but the encoder gives efficientnet-lite0 1280-d features" in one_line(error)
    assert not (tmp_path / "f").exists()


def test_feature_files_of_another_encoder_are_refused(tmp_path: Path) -> None:
    model = save_random(tmp_path / "m", d_in=1024, extra=dict(EXTRA, encoder="resnet50-trunc"))
    files = {"10x": fake_features(tmp_path / "a10.h5", mag=10), "20x": fake_features(tmp_path / "a20.h5")}
    with pytest.raises(ModelConfigError) as error:
        predict_features(features=files, model_dir=model, device="cpu")
    assert one_line(error) == (
        "model expects resnet50-trunc features (1024-d) but feature file a10.h5 has efficientnet-lite0 1280-d features"
    )
    # same width, other encoder name: still refused
    model = save_random(tmp_path / "m2", extra=dict(EXTRA, encoder="vit-custom"))
    with pytest.raises(ModelConfigError, match="expects vit-custom features .* has efficientnet-lite0 features"):
        predict_features(features=files, model_dir=model, device="cpu")
    # other encoder weights than the model was trained on
    model = save_random(tmp_path / "m3", extra=dict(EXTRA, encoder_weights_hash="f" * 64))
    ff = fake_features(tmp_path / "w.h5", weights_hash="0" * 64)
    with pytest.raises(ModelConfigError, match="from weights ffffffffffff but .* has features of weights 000000000000"):
        predict_features(features={"20x": ff}, model_dir=model, device="cpu")


def test_magnification_the_model_lacks(tmp_path: Path) -> None:
    model = save_random(tmp_path / "m")
    with pytest.raises(ModelConfigError, match="model has no 5x branch"):
        predict_features(features={"5x": fake_features(tmp_path / "a.h5", mag=5)}, model_dir=model, device="cpu")


def test_feature_files_of_two_slides(tmp_path: Path) -> None:
    model = save_random(tmp_path / "m")
    files = {"10x": fake_features(tmp_path / "a.h5", mag=10, slide_id="one"),
             "20x": fake_features(tmp_path / "b.h5", slide_id="two")}
    with pytest.raises(FeatureFileError) as error:
        predict_features(features=files, model_dir=model, device="cpu")
    assert "b.h5 is for slide fake (id two), not fake (id one)" in one_line(error)


def test_teacher_needs_genes(tmp_path: Path) -> None:
    model = save_random(tmp_path / "t", kind="teacher", n_tumor_genes=5, n_tme_genes=7, n_heads=2)
    files = {"20x": fake_features(tmp_path / "a.h5")}
    with pytest.raises(ModelConfigError) as error:
        predict_features(features=files, model_dir=model, device="cpu")
    assert "teacher model needs the patient's gene expression" in one_line(error)
    assert "genes=" not in str(error.value)  # no Python argument a CLI user cannot give
    genes = {"tumor": np.zeros(5), "tme": np.zeros(7)}
    pred = predict_features(features=files, model_dir=model, device="cpu", genes=genes)
    assert pred.model_kind == "teacher" and pred.patches["tumor_attention"].sum() == pytest.approx(1.0, abs=1e-5)


def test_blank_slide_has_no_tissue(tmp_path: Path) -> None:
    slide = tmp_path / "blank.tif"
    tifffile.imwrite(slide, np.full((1500, 2000, 3), 242, np.uint8), photometric="rgb", tile=(256, 256),
                     resolution=(4e4, 4e4), resolutionunit="CENTIMETER", metadata=None)  # 0.25 µm/px
    model = save_random(tmp_path / "m")
    with pytest.raises(SlideError) as error:
        predict_slide(slide_path=slide, model_dir=model, device="cpu", features_dir=tmp_path / "f",
                      out_dir=tmp_path / "b")
    assert "no tissue found in blank.tif" in one_line(error)  # the file, not its hash
    assert not (tmp_path / "b").exists()


def test_missing_model_and_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(predict, "DEMO_MODEL_DIR", tmp_path / "demo_model")
    with pytest.raises(ModelConfigError) as error:
        resolve_model_dir("demo")
    assert one_line(error) == "the demo model is not built yet: run `python -m training.recipes.demo_model`"
    with pytest.raises(ModelConfigError, match="not built yet"):
        predict_features(features={}, model_dir="demo")
    save_random(tmp_path / "demo_model")
    assert resolve_model_dir("demo") == tmp_path / "demo_model"
    with pytest.raises(ModelConfigError, match="does not exist"):
        predict_features(features={}, model_dir=tmp_path / "nope")


def test_bundle_of_another_slide(tmp_path: Path) -> None:
    from napari_dismm.slide import open_slide, write_sample_slide

    sample = write_sample_slide(tmp_path / "s.tif", width=600, height=500, mpp=0.5, seed=1)
    with open_slide(sample.path) as slide:
        info = slide.info
    pred = make_prediction()
    with pytest.raises(BundleMismatchError) as error:
        check_bundle_matches_slide(pred, info)
    assert one_line(error) == f"bundle is for slide {pred.slide_id} (slide one.svs), not {info.slide_id} (s.tif)"
    check_bundle_matches_slide(make_prediction(slide_id=info.slide_id), info)
    check_bundle_matches_slide(pred, pred.slide_id)
