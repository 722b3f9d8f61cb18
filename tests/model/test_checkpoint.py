"""Model directories: round trip, pickles refused, config and shape checks; the registry."""

import json

import numpy as np
import pytest
import torch

from napari_dismm.errors import ModelConfigError
from napari_dismm.model.baselines import ABMILConfig, LateFusionConfig
from napari_dismm.model.checkpoint import CONFIG, FORMAT_VERSION, WEIGHTS, load_model, save_model, weights_id
from napari_dismm.model.registry import build_model, config_from_dict
from napari_dismm.model.teacher import TeacherConfig
from tests.model.model_helpers import make_batch

CONFIGS = [
    TeacherConfig(task="survival", d_in=12, d=8, n_heads=2, n_tumor_genes=5, n_tme_genes=7),
    ABMILConfig(task="classification", n_outputs=3, d_in=12, d=8),
    LateFusionConfig(task="survival", d_in=12, d=8, n_tumor_genes=5, n_tme_genes=7),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.kind)
def test_round_trip_gives_same_outputs(tmp_path, config):
    torch.manual_seed(0)
    model = build_model(config).eval()
    batch = make_batch([4, 7], [9, 3], d_in=12, n_tumor=5, n_tme=7)
    extra = {"genes": {"tumor": ["TP53"], "tme": ["CD8A"]}, "bin_edges": np.array([0.0, 1.0, np.inf]), "mean": torch.zeros(2), "encoder": "resnet50_trunc"}
    model_id = save_model(model, tmp_path / "run", extra=extra)
    loaded, doc = load_model(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [CONFIG, WEIGHTS]  # no temp files left
    assert doc["model_id"] == model_id == weights_id(tmp_path / "run" / WEIGHTS) and len(model_id) == 12
    assert doc["genes"] == extra["genes"] and doc["encoder"] == "resnet50_trunc" and doc["bin_edges"] == [0.0, 1.0, None]
    json.loads((tmp_path / "run" / CONFIG).read_text(), parse_constant=lambda name: pytest.fail(f"non-strict JSON: {name}"))
    assert doc["mean"] == [0.0, 0.0]
    assert doc["model"]["kind"] == config.kind and not loaded.training
    with torch.no_grad():
        a = model(batch["bags"], coords=batch["coords"], masks=batch["masks"], genes=batch["genes"])
        b = loaded(batch["bags"], coords=batch["coords"], masks=batch["masks"], genes=batch["genes"])
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)


def test_pickle_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.pt")
    with pytest.raises(ModelConfigError, match=r"model\.pt.*never loaded"):
        load_model(tmp_path)
    with pytest.raises(ModelConfigError, match="pickle"):
        load_model(tmp_path / "model.pt")


def _saved(tmp_path):
    model = build_model(CONFIGS[0])
    save_model(model, tmp_path, extra={})
    return json.loads((tmp_path / CONFIG).read_text())


def test_shape_mismatch_names_the_key(tmp_path):
    doc = _saved(tmp_path)
    doc["model"]["d_in"] = 16
    (tmp_path / CONFIG).write_text(json.dumps(doc))
    with pytest.raises(ModelConfigError, match=r"embed\.10x\.net\.0\.weight \(8, 12\) != \(8, 16\)"):
        load_model(tmp_path)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    doc = _saved(tmp_path)
    doc["model"]["magnifications"] = ["10x", "40x"]
    (tmp_path / CONFIG).write_text(json.dumps(doc))
    with pytest.raises(ModelConfigError, match=r"missing: .*embed\.40x.*unexpected: .*embed\.20x"):
        load_model(tmp_path)


def test_config_keys_are_checked(tmp_path):
    doc = _saved(tmp_path)
    doc["model"]["n_layers"] = 3
    (tmp_path / CONFIG).write_text(json.dumps(doc))
    with pytest.raises(ModelConfigError, match="unknown TeacherConfig key.*n_layers"):
        load_model(tmp_path)
    del doc["model"]["n_layers"], doc["model"]["n_heads"]
    (tmp_path / CONFIG).write_text(json.dumps(doc))
    with pytest.raises(ModelConfigError, match="missing TeacherConfig key.*n_heads"):
        load_model(tmp_path)


def test_reserved_extra_and_corrupt_weights(tmp_path):
    model = build_model(CONFIGS[1])
    with pytest.raises(ModelConfigError, match="model_id"):
        save_model(model, tmp_path, extra={"model_id": "x"})
    with pytest.raises(ModelConfigError, match="object"):
        save_model(model, tmp_path / "b", extra={"thing": object()})
    save_model(model, tmp_path, extra={})
    (tmp_path / WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(ModelConfigError, match="safetensors"):
        load_model(tmp_path)


def test_registry_builds_every_kind_and_rejects_unknown():
    for config in CONFIGS:
        assert build_model(config).config is config
    from dataclasses import asdict

    again = config_from_dict(json.loads(json.dumps(asdict(CONFIGS[0]))))
    assert again == CONFIGS[0]  # lists from JSON come back as tuples
    assert config_from_dict({"kind": "abmil", "d": 4}).d == 4  # defaults fill the rest
    with pytest.raises(ModelConfigError, match="transmil"):
        build_model({"kind": "transmil"})
    with pytest.raises(ModelConfigError, match="heads"):
        config_from_dict({"kind": "teacher", "heads": 3})
    with pytest.raises(ModelConfigError, match="n_heads"):
        config_from_dict({"kind": "teacher", "d": 10, "n_heads": 4})
    with pytest.raises(ModelConfigError, match="combine"):
        config_from_dict({"kind": "teacher", "combine": "vote"})


def test_registry_builds_the_student():
    pytest.importorskip("napari_dismm.model.student")
    model = build_model({"kind": "student", "d_in": 12, "d": 8})
    assert model.config.kind == "student"


def test_format_1_students_load_with_the_hard_assignment_they_were_trained_with(tmp_path):
    """Format 2 added soft ITA memberships (the new default); a format-1 config.json has no
    `assignment` key and its student merged hard, so it must load hard and give the same
    outputs as before."""
    torch.manual_seed(0)
    model = build_model({"kind": "student", "d_in": 12, "d": 8, "n_heads": 2, "assignment": "hard"}).eval()
    save_model(model, tmp_path / "old")
    doc = json.loads((tmp_path / "old" / CONFIG).read_text())
    assert doc["format_version"] == FORMAT_VERSION and doc["model"]["assignment"] == "hard"
    del doc["model"]["assignment"], doc["model"]["temperature"]
    doc["format_version"] = 1
    (tmp_path / "old" / CONFIG).write_text(json.dumps(doc))
    loaded, _ = load_model(tmp_path / "old")
    assert loaded.config.assignment == "hard"
    batch = make_batch([5, 8], [7, 3], d_in=12, n_tumor=2, n_tme=2)
    with torch.no_grad():
        torch.testing.assert_close(model(batch["bags"], masks=batch["masks"]).logits,
                                   loaded(batch["bags"], masks=batch["masks"]).logits, atol=0, rtol=0)
    # in a current file the key is required, as every other one
    doc["format_version"] = FORMAT_VERSION
    (tmp_path / "old" / CONFIG).write_text(json.dumps(doc))
    with pytest.raises(ModelConfigError, match="assignment"):
        load_model(tmp_path / "old")


def test_the_shipped_demo_model_is_of_the_current_format():
    """The demo student is retrained whenever the models change (training/recipes/demo_model.py)."""
    from importlib.resources import files

    demo = files("napari_dismm") / "data" / "demo_model"
    model, doc = load_model(demo)
    assert doc["format_version"] == FORMAT_VERSION and model.config.assignment == "soft"


def test_format_1_teachers_load_without_spatial_context(tmp_path):
    model = build_model(TeacherConfig(d_in=12, d=8, n_heads=2, n_tumor_genes=5, n_tme_genes=7, spatial_context=0.0))
    save_model(model, tmp_path / "old")
    doc = json.loads((tmp_path / "old" / CONFIG).read_text())
    del doc["model"]["spatial_context"]
    doc["format_version"] = 1
    (tmp_path / "old" / CONFIG).write_text(json.dumps(doc))
    assert load_model(tmp_path / "old")[0].config.spatial_context == 0.0


def test_format_2_teachers_load_without_the_gene_residual_and_slide_head(tmp_path):
    """Format 3 added the gene residual and the slide-only head (issue 13); a format-2
    teacher had neither and must load as it was trained, with the same outputs."""
    torch.manual_seed(0)
    config = TeacherConfig(d_in=12, d=8, n_heads=2, n_tumor_genes=5, n_tme_genes=7, gene_residual=False,
                           slide_head=False, gene_dropout=0.0, base_query=False)
    model = build_model(config).eval()
    save_model(model, tmp_path / "old")
    doc = json.loads((tmp_path / "old" / CONFIG).read_text())
    for key in ("gene_residual", "slide_head", "gene_dropout", "base_query"):
        del doc["model"][key]
    doc["format_version"] = 2
    (tmp_path / "old" / CONFIG).write_text(json.dumps(doc))
    loaded, _ = load_model(tmp_path / "old")
    assert (loaded.config.gene_residual, loaded.config.slide_head) == (False, False)
    batch = make_batch([5, 8], [7, 3], d_in=12, n_tumor=5, n_tme=7)
    kwargs = {"masks": batch["masks"], "coords": batch["coords"], "genes": batch["genes"]}
    with torch.no_grad():
        torch.testing.assert_close(model(batch["bags"], **kwargs).logits, loaded(batch["bags"], **kwargs).logits,
                                   atol=0, rtol=0)
