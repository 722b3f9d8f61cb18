"""`dismm synth`, `dismm train` and `dismm evaluate` through their registered parsers."""

from __future__ import annotations

import argparse
import json
from importlib.metadata import entry_points

import pandas as pd
import pytest

from napari_dismm.errors import DismmError
from training.commands import register_evaluate, register_synth, register_train

TINY = """
[model]
d = 16
dropout = 0.0
[data]
batch_size = 4
[teacher]
epochs = 1
[student]
epochs = 1
[baselines]
epochs = 1
run = ["abmil"]
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dismm(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dismm")
    sub = parser.add_subparsers(dest="command")
    for register in (register_synth, register_train, register_evaluate):
        register(sub)
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmd")
    assert dismm(["synth", "--out", str(root / "c"), "--patients", "12", "--tumor-genes", "4", "--tme-genes", "4"]) == 0
    (root / "cfg.toml").write_text(TINY)
    c = root / "c"
    code = dismm(["train", "--cohort", str(c / "cohort.csv"), "--expression", str(c / "expression.tsv"),
                  "--gene-sets", str(c / "sets.gmt"), "--task", "classification", "--out", str(root / "run"),
                  "--config", str(root / "cfg.toml"), "--threads", "1"])
    assert code == 0
    return root


def test_synth_writes_a_loadable_cohort_with_truth(trained):
    c = trained / "c"
    cohort = pd.read_csv(c / "cohort.csv")
    assert len(cohort) == 12 and set(cohort.columns) >= {"patient_id", "slide_id", "features_10x", "features_20x", "label"}
    regions = pd.read_csv(c / "regions.csv")
    assert set(regions["region"]) == {"other", "tumor", "tme"}
    assert len(pd.read_csv(c / "truth.csv")) == 12


def test_train_writes_the_run_and_evaluate_prints_it(trained, capsys):
    run = trained / "run"
    assert {p.name for p in run.iterdir()} >= {"teacher", "student", "abmil", "summary.json", "figures"}
    assert dismm(["evaluate", str(run)]) == 0
    table = capsys.readouterr().out
    assert "teacher" in table and "student" in table and "±" in table
    assert dismm(["evaluate", str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"teacher", "student", "abmil"}
    assert set(summary["student"]["auc"]) == {"mean", "sd", "folds"}


def test_evaluate_on_a_non_run_is_a_dismm_error(tmp_path):
    with pytest.raises(DismmError, match="no finished fold"):
        dismm(["evaluate", str(tmp_path)])
    with pytest.raises(DismmError, match="not found"):
        dismm(["evaluate", str(tmp_path / "missing")])


def test_train_with_bad_config_is_a_dismm_error(trained, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[teacher]\nlearning_rate = 1.0\n")
    c = trained / "c"
    with pytest.raises(DismmError, match="learning_rate"):
        dismm(["train", "--cohort", str(c / "cohort.csv"), "--expression", str(c / "expression.tsv"),
               "--task", "classification", "--out", str(tmp_path / "r"), "--config", str(bad)])


@pytest.mark.skipif(not any(e.name == "evaluate" for e in entry_points(group="napari_dismm.commands")),
                    reason="training commands not registered in this install (pyproject entry points)")
def test_the_dismm_command_reaches_them(trained, capsys):
    from napari_dismm.cli import main

    assert main(["evaluate", str(trained / "run"), "--json"]) == 0
    assert "teacher" in json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(trained / "nowhere")]) == 2
