"""The prediction bundle: round trip, atomic rewrite, and one clear error per malformed file."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_dismm.bundle import (
    ATTENTION_GEOJSON,
    PATCH_COLUMNS,
    PATCHES_CSV,
    PREDICTION_JSON,
    BundleError,
    Prediction,
    empty_patches,
    is_bundle_dir,
    read_bundle,
    write_bundle,
)
from napari_dismm.errors import DismmError, FeatureFileError


def make_patches(n: int = 12, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for mag, size in (("10x", 448), ("20x", 224)):
        att = rng.random((2, n))
        att /= att.sum(axis=1, keepdims=True)
        for i in range(n):
            rows.append({
                "x": int(i * size), "y": int(3 * size), "width": size, "height": size, "magnification": mag,
                "tumor_attention": float(att[0, i]), "tme_attention": float(att[1, i]),
                "ita_cluster": int(i % 2), "ita_centre": bool(i < 2),
            })
    return pd.DataFrame(rows)


def make_prediction(task: str = "classification", **overrides) -> Prediction:
    base = dict(
        slide_id="0f" * 32, slide_name="slide one.svs", model_id="abc123def456", model_kind="student",
        task=task, class_names=[], probabilities=None, predicted_class=None, risk=None, survival=None,
        bin_edges=None, trained_for="test model", mpp=0.2501, level0_size=(6000, 4000),
        patches=make_patches(), tissue_contours=[[(10.5, 20.0), (900.0, 20.0), (900.0, 700.25)]],
        timings={"encode": 1.25},
    )
    if task == "classification":
        base.update(class_names=["LGG", "GBM", "astro"], probabilities=[0.1, 0.7, 0.2], predicted_class="GBM")
    else:
        base.update(risk=-2.3, survival=[0.9, 0.6, 0.4, 0.3], bin_edges=[0.0, 5.5, 12.0, 30.0, float("inf")])
    base.update(overrides)
    return Prediction(**base)


@pytest.mark.parametrize("task", ["classification", "survival"])
def test_round_trip_is_equal(tmp_path: Path, task: str) -> None:
    pred = make_prediction(task)
    out = write_bundle(pred, tmp_path / "bundle")
    assert is_bundle_dir(out)
    # plus the files for other tools (napari_dismm.export.write_bundle_overlays)
    assert {PREDICTION_JSON, PATCHES_CSV, ATTENTION_GEOJSON} <= {p.name for p in out.iterdir()}
    back = read_bundle(out)
    assert back == pred
    # exact floats, dtypes and column order survive the CSV
    assert list(back.patches.columns) == list(PATCH_COLUMNS)
    np.testing.assert_array_equal(back.patches["tumor_attention"], pred.patches["tumor_attention"])
    assert back.patches["ita_centre"].dtype == bool
    assert back.level0_size == (6000, 4000) and isinstance(back.level0_size, tuple)
    assert back.tissue_contours == pred.tissue_contours
    if task == "survival":
        assert back.bin_edges[-1] is None  # +inf is written as null, the JSON way
    # reading the prediction.json path works too
    assert read_bundle(out / PREDICTION_JSON) == pred


def test_changed_field_is_not_equal() -> None:
    pred = make_prediction()
    assert pred != replace(pred, risk=1.0)
    other = make_prediction(patches=make_patches(seed=1))
    assert pred != other


def test_json_has_every_scalar_and_no_patches(tmp_path: Path) -> None:
    out = write_bundle(make_prediction(), tmp_path / "b")
    doc = json.loads((out / PREDICTION_JSON).read_text())
    for key in ("slide_id", "slide_name", "model_id", "model_kind", "task", "class_names", "probabilities",
                "predicted_class", "risk", "survival", "bin_edges", "trained_for", "mpp", "level0_size",
                "software_version", "created", "timings"):
        assert key in doc
    assert "patches" not in doc and doc["n_patches"] == 24


def test_rewrite_replaces_files_and_keeps_others(tmp_path: Path) -> None:
    out = tmp_path / "b"
    write_bundle(make_prediction(), out)
    (out / "features").mkdir()
    (out / "features" / "keep.txt").write_text("x")
    second = make_prediction(patches=make_patches(n=5))
    write_bundle(second, out)
    assert read_bundle(out) == second
    assert (out / "features" / "keep.txt").read_text() == "x"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp dir left
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_empty_patch_table_round_trips(tmp_path: Path) -> None:
    pred = make_prediction(patches=empty_patches())
    assert read_bundle(write_bundle(pred, tmp_path / "b")) == pred


def test_is_bundle_dir(tmp_path: Path) -> None:
    assert not is_bundle_dir(tmp_path)
    assert not is_bundle_dir(tmp_path / "missing")
    (tmp_path / PREDICTION_JSON).write_text("{}")
    assert not is_bundle_dir(tmp_path)
    (tmp_path / PATCHES_CSV).write_text("")
    assert is_bundle_dir(tmp_path)
    assert not is_bundle_dir(tmp_path / PREDICTION_JSON)


def _break(out: Path, name: str, text: str) -> None:
    (out / name).write_text(text)


def _edit_json(out: Path, **changes) -> None:
    doc = json.loads((out / PREDICTION_JSON).read_text())
    for key, value in changes.items():
        if value is ...:
            doc.pop(key)
        else:
            doc[key] = value
    (out / PREDICTION_JSON).write_text(json.dumps(doc))


MALFORMED = {
    "no json": (lambda out: (out / PREDICTION_JSON).unlink(), "prediction.json is missing"),
    "no csv": (lambda out: (out / PATCHES_CSV).unlink(), "patches.csv is missing"),
    "bad json": (lambda out: _break(out, PREDICTION_JSON, "{not json"), "is not valid JSON"),
    "other json": (lambda out: _break(out, PREDICTION_JSON, '{"type": "FeatureCollection"}'), "not a dismm prediction"),
    "newer": (lambda out: _edit_json(out, version=99), "newer napari-dismm"),
    "no slide id": (lambda out: _edit_json(out, slide_id=...), "lacks required field(s) ['slide_id']"),
    "bad task": (lambda out: _edit_json(out, task="segmentation"), "task must be one of"),
    "probabilities": (lambda out: _edit_json(out, probabilities=[0.5, 0.5]), "one probability per class"),
    "count": (lambda out: _edit_json(out, n_patches=3), "lists 3 patches, patches.csv has 24"),
    "column": (lambda out: _break(out, PATCHES_CSV, "x,y,w\n1,2,3\n"), "missing ['width', 'height'"),
    "text": (
        lambda out: _break(out, PATCHES_CSV, ",".join(PATCH_COLUMNS) + "\n1,2,a,4,10x,0.5,0.5,0,true\n"),
        "non-numeric value",
    ),
    "centre": (
        lambda out: _break(out, PATCHES_CSV, ",".join(PATCH_COLUMNS) + "\n1,2,3,4,10x,0.5,0.5,0,maybe\n"),
        "ita_centre must be true/false",
    ),
    "empty csv": (lambda out: _break(out, PATCHES_CSV, ""), "not a readable CSV"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_bundle_has_one_clear_message(tmp_path: Path, case: str) -> None:
    out = write_bundle(make_prediction(), tmp_path / "b")
    damage, message = MALFORMED[case]
    damage(out)
    with pytest.raises(BundleError) as info:
        read_bundle(out)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert isinstance(info.value, FeatureFileError) and isinstance(info.value, DismmError)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a prediction bundle directory"):
        read_bundle(tmp_path / "nowhere")


def test_write_refuses_inconsistent_prediction(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="one probability per class"):
        write_bundle(make_prediction(probabilities=[1.0]), tmp_path / "b")
    with pytest.raises(BundleError, match="non-finite"):
        write_bundle(make_prediction(probabilities=[float("nan"), 0.5, 0.5]), tmp_path / "c")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    with pytest.raises(BundleError, match="columns must be"):
        make_prediction(patches=make_patches().drop(columns="ita_cluster"))
