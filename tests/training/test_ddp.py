"""`dismm train` under torchrun with 2 CPU processes (gloo): it finishes, only rank 0
writes, and one epoch with B/2 slides per process equals one process with B slides."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.ddp import DistContext, env_world_size, init_from_env
from tests.training.synth_files import write_cohort

REPO = Path(__file__).resolve().parents[2]
# no dropout (nor gene dropout: each process draws its own masks) and no DEV (a batch
# variance does not split over processes); CGC on, to check it under DDP too
CONFIG = """
[model]
d = 16
dropout = 0.0
[data]
batch_size = 4
[teacher]
epochs = 1
lr = 0.01
gene_dropout = 0.0
cgc = true
"""
DRIVER = """
import argparse, sys
from training.commands import register_train
parser = argparse.ArgumentParser()
register_train(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.handler(args))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(files, out: Path, config: Path) -> list[str]:
    return ["train", "--cohort", str(files.csv), "--expression", str(files.expression), "--gene-sets", str(files.gmt),
            "--task", "survival", "--out", str(out), "--config", str(config), "--models", "teacher_no_dev",
            "--threads", "1"]


@pytest.mark.slow
def test_two_process_epoch_equals_one_process(tmp_path):
    files = write_cohort(tmp_path / "cohort", task="survival", n_patients=12, feature_dim=8)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    single, multi = tmp_path / "single", tmp_path / "ddp"
    one = subprocess.run([sys.executable, str(driver), *_train_args(files, single, config)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(driver), *_train_args(files, multi, config)],
        env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("teacher_no_dev") == 1  # only rank 0 prints the table

    single_files = sorted(p.relative_to(single) for p in single.rglob("*") if p.is_file())
    multi_files = sorted(p.relative_to(multi) for p in multi.rglob("*") if p.is_file())
    assert single_files == multi_files
    for k in range(3):
        fold = Path("teacher_no_dev") / f"fold_{k}"
        a = load_file(str(single / fold / "best" / "model.safetensors"))
        b = load_file(str(multi / fold / "best" / "model.safetensors"))
        for key in a:
            # gloo sums the two halves' gradients in another order than one process does, and
            # Adam amplifies those float32 rounding differences on near-zero gradients (seen:
            # 2.5e-5). A missing or wrong all-reduce moves weights by ~lr = 1e-2 per step.
            assert torch.allclose(a[key], b[key], atol=2e-4, rtol=0), (k, key, (a[key] - b[key]).abs().max())
        metrics = json.loads((multi / fold / "metrics.json").read_text())["test"]
        assert metrics["c_index"] is not None and 0.0 <= metrics["c_index"] <= 1.0
        state = json.loads((multi / fold / "checkpoint" / "state.json").read_text())
        assert state["world_size"] == 2 and state["epoch"] == 1


def test_single_process_context_outside_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert env_world_size() == 1
    ctx = init_from_env()
    assert ctx == DistContext() and ctx.is_main and not ctx.distributed


def test_torchrun_env_without_master_is_a_clear_error(monkeypatch):
    from napari_dismm.errors import DismmError

    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(DismmError, match="torchrun"):
        init_from_env()
