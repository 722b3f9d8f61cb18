"""Training config: defaults, TOML round trip, and one clear line for every bad key or value."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

from napari_dismm.errors import ModelConfigError
from training.config import SECTIONS, TrainConfig, config_to_dict, config_to_toml, dump_config, load_config


def _write(tmp_path, text: str):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == TrainConfig()
    assert cfg.cv.folds == 3 and cfg.data.max_patches == 4096 and cfg.student.temperature == 2.0
    assert cfg.baselines.run == ("abmil", "late_fusion", "genes_only")


def test_partial_file_overrides_only_its_keys(tmp_path):
    cfg = load_config(_write(tmp_path, "[teacher]\nlr = 1e-3\nepochs = 5\n[cv]\nfolds = 5\n[baselines]\nrun = ['abmil']\n"))
    assert cfg.teacher.lr == 1e-3 and cfg.teacher.epochs == 5 and cfg.cv.folds == 5
    assert cfg.teacher.weight_decay == TrainConfig().teacher.weight_decay
    assert cfg.baselines.run == ("abmil",)


def test_integer_given_for_a_float_is_accepted_as_float(tmp_path):
    cfg = load_config(_write(tmp_path, "[student]\ntemperature = 3\n"))
    assert cfg.student.temperature == 3.0 and isinstance(cfg.student.temperature, float)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("[teacher]\nlearning_rate = 0.1\n", r"unknown key 'learning_rate' in \[teacher\] \(allowed: epochs, lr, "),
        ("[trainer]\nepochs = 3\n", r"unknown section or key 'trainer' \(allowed sections: data, model, teacher"),
        ("seed = 3\n", r"unknown section or key 'seed'"),
        ("[teacher]\nlr = 0\n", r"\[teacher\] lr = 0: must be > 0 \(AdamW learning rate\)"),
        ("[student]\nlr = -1e-4\n", r"\[student\] lr = -0.0001: must be > 0"),
        ("[teacher]\nepochs = 0\n", r"\[teacher\] epochs = 0: must be >= 1"),
        ("[cv]\nfolds = 1\n", r"\[cv\] folds = 1: must be >= 2"),
        ("[cv]\nval_fraction = 1.0\n", r"\[cv\] val_fraction = 1.0: must be > 0 and < 1"),
        ("[model]\ndropout = 1.0\n", r"\[model\] dropout = 1.0: must be >= 0 and < 1"),
        ("[model]\nd = 130\n", r"n_heads = 4: must divide d = 130"),
        ("[model]\ncombine = 'vote'\n", r"'vote' is not one of max_confidence, mean"),
        ("[data]\nbatch_size = 2.5\n", r"\[data\] batch_size = 2.5: must be an integer"),
        ("[teacher]\ncgc = 1\n", r"\[teacher\] cgc = 1: must be true or false"),
        ("[baselines]\nrun = ['abmil', 'transmil']\n", r"'transmil' is not one of abmil, late_fusion"),
        ("[data]\nmagnifications = '10x'\n", r"must be a list of strings"),
        ("teacher = 3\n", r"'teacher' must be a \[teacher\] section"),
        ("[teacher\nlr = 1\n", r"not valid TOML"),
    ],
)
def test_rejections_name_the_key(tmp_path, text, pattern):
    with pytest.raises(ModelConfigError, match=pattern) as info:
        load_config(_write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ModelConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml")


def test_dump_round_trip_with_descriptions(tmp_path):
    cfg = load_config(_write(tmp_path, "[student]\nlambda_kd = 0.5\n[data]\nmagnifications = ['20x']\n"))
    path = dump_config(cfg, tmp_path / "run" / "config.resolved.toml")
    assert load_config(path) == cfg
    text = path.read_text()
    assert "# distillation temperature T" in text
    # every field of every section is written, so the file documents the run completely
    parsed = tomllib.loads(text)
    assert parsed == config_to_dict(cfg)
    assert sum(len(dataclasses.fields(cls)) for cls in SECTIONS.values()) == sum(len(v) for v in parsed.values())


def test_every_field_has_a_description():
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"[{name}] {f.name} has no description"
    assert config_to_toml(TrainConfig()).count("\n# ") >= 30
