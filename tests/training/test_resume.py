"""A run killed after its first epoch checkpoint and started again ends exactly like an
uninterrupted run (same metrics, same history, same best weights), also when the fold keeps
the moving average of its weights ([cv] weight_ema)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.training.synth_files import write_cohort

CONFIG = {"model": {"d": 16, "dropout": 0.25}, "data": {"batch_size": 4, "max_patches": 40},
          "teacher": {"epochs": 8, "patience": 0}, "cv": {"folds": 2}}
DRIVER = """
import json, sys, torch
torch.set_num_threads(1)
from training.config import config_from_dict
from training.run import run_training
root, out = sys.argv[1], sys.argv[2]
run_training(cohort_csv=root + "/cohort.csv", expression=root + "/expression.tsv", gene_sets=root + "/sets.gmt",
             task="classification", out=out, config=config_from_dict(json.loads(sys.argv[3])), models=["teacher"],
             log=None)
"""
REPO = Path(__file__).resolve().parents[2]


def _start(root: Path, out: Path, config: dict = CONFIG) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(root), str(out), json.dumps(config)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("weight_ema", [0.0, 0.9], ids=["last_weights", "weight_average"])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, weight_ema):
    config = {**CONFIG, "cv": {**CONFIG["cv"], "weight_ema": weight_ema}}
    files = write_cohort(tmp_path / "cohort", n_patients=16, feature_dim=8)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    reference = _start(files.root, straight, config)

    proc = _start(files.root, resumed, config)
    state = resumed / "teacher" / "fold_0" / "checkpoint" / "state.safetensors"
    deadline = time.monotonic() + 240
    while not state.exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / "teacher" / "fold_0" / "metrics.json").exists(), "killed too late to test resuming"
    # The scalars inside the safetensors file are the checkpoint; state.json is a copy for people,
    # written after the rename, so a kill can land between the two.
    with safe_open(str(state), framework="pt") as handle:
        epochs_done = json.loads(handle.metadata()["scalars"])["epoch"]
    assert 1 <= epochs_done < CONFIG["teacher"]["epochs"]

    _finish(_start(files.root, resumed, config))
    _finish(reference)
    for k in range(2):
        a, b = straight / "teacher" / f"fold_{k}", resumed / "teacher" / f"fold_{k}"
        assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
        assert (a / "history.json").read_text() == (b / "history.json").read_text()
        assert (a / "best" / "model.safetensors").read_bytes() == (b / "best" / "model.safetensors").read_bytes()
    assert (straight / "summary.json").read_text() == (resumed / "summary.json").read_text()
