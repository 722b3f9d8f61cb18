"""Bundles, model directories and training checkpoints follow the umask, so a colleague on a
shared server can open them (mkdtemp / mkstemp would make them 0700 / 0600)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from napari_dismm.bundle import write_bundle
from napari_dismm.model.checkpoint import save_model
from tests.test_bundle import make_prediction
from tests.test_predict import save_random


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def _modes(root):
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_bundle_respects_umask(tmp_path, umask_022):
    out = write_bundle(make_prediction(), tmp_path / "bundle")
    modes = _modes(out)
    assert modes["."] == 0o755 and modes["prediction.json"] == 0o644 and modes["patches.csv"] == 0o644
    write_bundle(make_prediction(), out)  # rewriting in place keeps them readable
    assert set(_modes(out).values()) <= {0o755, 0o644}


def test_model_directory_respects_umask(tmp_path, umask_022):
    model = save_random(tmp_path / "best")
    assert set(_modes(model).values()) == {0o755, 0o644}


def test_training_checkpoint_respects_umask(tmp_path, umask_022):
    from training.engine import save_checkpoint

    net = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(net.parameters())
    save_checkpoint(tmp_path / "ckpt", model=net, optimizer=opt, best={}, info={"epoch": 1})
    assert set(_modes(tmp_path / "ckpt").values()) == {0o755, 0o644}
    assert not list((tmp_path / "ckpt").glob(".*tmp"))
