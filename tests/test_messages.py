"""Messages a command-line user can act on: files named, flags (not Python arguments) given."""

from __future__ import annotations

import pytest

from napari_dismm.cli import main
from napari_dismm.errors import ModelConfigError
from napari_dismm.predict import predict_slide
from tests.test_predict import EXTRA, save_random


def test_synthetic_model_on_a_slide_says_why(tmp_path, capsys, cmu_slide_path):
    model = save_random(tmp_path / "m", extra=dict(EXTRA, encoder="synthetic"))
    with pytest.raises(ModelConfigError, match="trained on `dismm synth` features"):
        predict_slide(slide_path=cmu_slide_path, model_dir=model, device="cpu", features_dir=tmp_path / "f")
    assert not (tmp_path / "f").exists()
    assert main(["predict", str(cmu_slide_path), "--model", str(model), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "unknown encoder" not in err and "dismm extract" in err and not (tmp_path / "b").exists()


def test_weight_file_message_gives_the_flag():
    from napari_dismm.features.encoders import get_encoder

    with pytest.raises(ModelConfigError, match="--weights FILE"):
        get_encoder("resnet50-trunc")


def test_gene_set_message_gives_no_python_mapping(tmp_path):
    from napari_dismm.errors import DataError
    from napari_dismm.omics import load_gene_sets

    gmt = tmp_path / "one_side.gmt"
    gmt.write_text("TUMOR_A\tna\tMYC\tMKI67\n")
    with pytest.raises(DataError) as error:
        load_gene_sets(gmt)
    assert "mapping" not in str(error.value) and "TME_" in str(error.value)
