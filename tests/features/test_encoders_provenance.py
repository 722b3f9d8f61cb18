"""Provenance that prevents mixing: recipe, weights hash and pixel pipeline travel with the
features into the model, and `dismm predict` refuses features of another encoder.

End to end on the real CMU slide with a foundation-model recipe (Kaiko ViT-B/16, a
generated full-size file): ``dismm extract --encoder kaiko-vitb16 --weights FILE``, then
``dismm predict`` with a model trained on those features (exit 0), and with models
recording another recipe or another pipeline (exit 2, one line).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_dismm.cli import main
from napari_dismm.errors import ModelConfigError
from napari_dismm.features.encoders import get_encoder
from napari_dismm.features.encoders.provenance import check_same_encoder, model_record
from napari_dismm.features.h5 import FeatureFile, read_features, write_features
from tests.features.test_encoders_recipes import kaiko_file  # noqa: F401  (fixture)
from tests.test_predict import save_random


def test_old_names_count_as_their_recipe_and_missing_records_are_not_held_against_input():
    check_same_encoder(expected="vit-large-16", got="uni", where="x has")
    check_same_encoder(expected="uni", got="vit-large-16", where="x has", expected_hash="a" * 16)
    check_same_encoder(expected="efficientnet-lite0", got="efficientnet-lite0", where="x has",
                       expected_preprocessing='{"a":1}', got_preprocessing=None)  # a file of before the field


def test_another_recipe_weights_or_pipeline_is_refused_in_one_line():
    cases = [
        (dict(got="phikon-v2"), "model expects uni features but x has phikon-v2 features"),
        (dict(got="uni", expected_hash="a" * 16, got_hash="b" * 16), "from weights aaaaaaaaaaaa but x has features"),
        (dict(got="uni", expected_preprocessing='{"mean":[0.5]}', got_preprocessing='{"mean":[0.485]}'),
         'preprocessed as {"mean":[0.5]} but x has features preprocessed as {"mean":[0.485]}'),
    ]
    for kwargs, text in cases:
        with pytest.raises(ModelConfigError) as info:
            check_same_encoder(expected="uni", where="x has", **kwargs)
        assert text in str(info.value) and "\n" not in str(info.value)


def test_feature_files_carry_the_pipeline_and_models_take_it_over(tmp_path):
    enc = get_encoder("efficientnet-lite0")
    ff = FeatureFile(features=np.zeros((2, 1280), np.float32), coords=np.zeros((2, 2), np.int64),
                     encoder=enc.name, encoder_weights_hash=enc.weights_hash,
                     encoder_preprocessing=enc.preprocessing)
    back = read_features(write_features(tmp_path / "a.h5", ff))
    assert back.encoder_preprocessing == enc.preprocessing
    assert '"mean":[0.5,0.5,0.5]' in enc.preprocessing and '"output":"pool"' in enc.preprocessing
    assert model_record(back) == {"encoder": "efficientnet-lite0", "encoder_weights_hash": enc.weights_hash,
                                  "encoder_preprocessing": enc.preprocessing}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, cmu_slide_path, kaiko_file) -> Path:
    out = tmp_path_factory.mktemp("kaiko-features")
    code = main(["extract", str(cmu_slide_path), "--out", str(out), "--encoder", "kaiko-vitb16",
                 "--weights", str(kaiko_file), "--magnifications", "10", "--workers", "1"])
    assert code == 0
    (path,) = sorted(out.rglob("*.h5"))
    return path


def _model(directory: Path, record: dict) -> Path:
    extra = {"magnifications": ["10x"], "class_names": ["a", "b", "c"], **record}
    return save_random(directory, d_in=768, magnifications=("10x",), extra=extra)


def test_extract_with_a_recipe_then_predict_with_a_model_of_its_features(tmp_path, extracted, capsys):
    ff = read_features(extracted)
    assert ff.encoder == "kaiko-vitb16" and ff.dim == 768 and ff.n_patches > 0
    assert ff.encoder_weights_hash and ff.encoder_weights_hash != "random-init"
    assert '"mean":[0.5,0.5,0.5]' in ff.encoder_preprocessing
    model = _model(tmp_path / "m", model_record(ff))
    assert main(["predict", str(extracted), "--model", str(model), "--out", str(tmp_path / "bundle")]) == 0
    assert (tmp_path / "bundle" / "prediction.json").is_file()


@pytest.mark.parametrize("change", ["recipe", "weights", "pipeline"])
def test_predict_refuses_a_model_of_other_features(tmp_path, extracted, capsys, change):
    record = model_record(read_features(extracted))
    if change == "recipe":  # same width (768), other model: Phikon
        record["encoder"] = "phikon"
    elif change == "weights":
        record["encoder_weights_hash"] = "0" * 16
    else:
        record["encoder_preprocessing"] = record["encoder_preprocessing"].replace("[0.5,0.5,0.5]", "[0.485,0.456,0.406]", 1)
    model = _model(tmp_path / "m", record)
    capsys.readouterr()
    assert main(["predict", str(extracted), "--model", str(model), "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dismm: error: model expects") and "\n" not in err
    assert not (tmp_path / "bundle").exists()


def test_predict_on_the_slide_with_the_encoder_weights(tmp_path, extracted, cmu_slide_path, kaiko_file, capsys):
    """``dismm predict SLIDE --weights FILE``: the recipe's encoder is built from the file and the
    features extracted above are found again by their content key (nothing re-encoded)."""
    model = _model(tmp_path / "m", model_record(read_features(extracted)))
    before = extracted.stat().st_mtime_ns
    code = main(["predict", str(cmu_slide_path), "--model", str(model), "--out", str(tmp_path / "bundle"),
                 "--weights", str(kaiko_file), "--features-dir", str(extracted.parents[2]), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "bundle" / "prediction.json").is_file()
    assert extracted.stat().st_mtime_ns == before
    # without the weights the recipe refuses to run on random ones
    assert main(["predict", str(cmu_slide_path), "--model", str(model), "--out", str(tmp_path / "b2"),
                 "--features-dir", str(extracted.parents[2])]) == 2
    assert "needs a local weight file" in capsys.readouterr().err
