"""Unreadable slide tiles are counted, recorded in the feature files and prediction.json,
and above a stated share nothing is predicted (exit 2) instead of a confident number."""

from __future__ import annotations

import json
import re

import pytest
import tifffile

from napari_dismm.cli import main
from napari_dismm.features.extract import MAX_UNREADABLE_SHARE
from napari_dismm.slide import write_sample_slide
from tests.slide_fixtures import corrupt_tile
from tests.test_predict import save_random


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_random(tmp_path_factory.mktemp("model") / "student")


def _slide(path, *, every: int):
    """Sample slide (mpp 0.5: 20x reads level 0) with every ``every``-th level-0 tile
    corrupted, starting in the middle (tissue detection reads the intact level 1)."""
    write_sample_slide(path, width=2048, height=1536, mpp=0.5, tile=256, seed=3, n_levels=2)
    with tifffile.TiffFile(path) as tif:
        n = len(tif.series[0].levels[0].keyframe.dataoffsets)
    for index in range(n // 2 + 4, n, every):
        corrupt_tile(path, level=0, index=index)
    for index in range(n // 2 + 4 - every, -1, -every):
        corrupt_tile(path, level=0, index=index)
    return path


def test_few_bad_tiles_are_counted_in_prediction_json(tmp_path, capsys, model):
    slide = _slide(tmp_path / "dented.tif", every=1000)  # one tile
    out = tmp_path / "bundle"
    with pytest.warns(UserWarning, match="unreadable tile"):
        code = main(["predict", str(slide), "--model", str(model), "--out", str(out), "--device", "cpu",
                     "--features-dir", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert code == 0, err
    # the encoding bar: percentage, elapsed and remaining time
    assert re.search(r"dismm: encode patches: 100%\|.*\| \[\d\d:\d\d<00:00\]", err), err
    doc = json.loads((out / "prediction.json").read_text())
    assert doc["unreadable_tiles"] >= 1 and doc["tiles_read"] > doc["unreadable_tiles"]
    assert doc["unreadable_tiles"] / doc["tiles_read"] <= MAX_UNREADABLE_SHARE
    # a second prediction reuses the cached features and still reports the count
    assert main(["predict", str(slide), "--model", str(model), "--out", str(tmp_path / "again"), "--device", "cpu",
                 "--features-dir", str(tmp_path / "f")]) == 0
    again = json.loads((tmp_path / "again" / "prediction.json").read_text())
    assert again["unreadable_tiles"] == doc["unreadable_tiles"]


def test_many_bad_tiles_refused(tmp_path, capsys, model):
    slide = _slide(tmp_path / "broken.tif", every=2)
    out = tmp_path / "bundle"
    with pytest.warns(UserWarning):
        code = main(["predict", str(slide), "--model", str(model), "--out", str(out), "--device", "cpu",
                     "--features-dir", str(tmp_path / "f")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dismm: error")]
    assert code == 2 and len(err) == 1
    assert "broken.tif" in err[0] and "unreadable" in err[0] and "5%" in err[0]
    assert not out.exists()
    # 10x reads the intact level 1 and is kept; no 20x file from mostly-background patches
    assert [p.parent.name for p in (tmp_path / "f").rglob("*.h5")] == ["10x"]
