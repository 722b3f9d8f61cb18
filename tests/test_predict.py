"""Slide or feature files + model -> prediction bundle, on a generated slide with a
randomly initialised student (real encoder, real tiling, real feature files)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_dismm.bundle import is_bundle_dir, read_bundle
from napari_dismm.features.h5 import read_features
from napari_dismm.model.checkpoint import save_model
from napari_dismm.model.registry import build_model
from napari_dismm.predict import Cancelled, predict_features, predict_slide

SIZE = (3000, 2500)
MPP = 0.25
CLASSES = ["tumor-rich", "stroma-rich", "immune-rich"]
EXTRA = {"encoder": "efficientnet-lite0", "magnifications": ["10x", "20x"], "class_names": CLASSES,
         "trained_for": "3-class test model"}


def save_random(directory: Path, *, kind: str = "student", extra: dict | None = None, seed: int = 0, **arch) -> Path:
    config = {"kind": kind, "task": "classification", "n_outputs": 3, "d_in": 1280, "d": 32,
              "magnifications": ("10x", "20x")}
    if kind == "student":
        config.update(n_heads=2, n_anchors=64, n_candidates=64)
    config.update(arch)
    torch.manual_seed(seed)
    save_model(build_model(config), directory, extra=EXTRA if extra is None else extra)
    return directory


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One generated slide, one student, one prediction (the encoder runs once here)."""
    from napari_dismm.slide import write_sample_slide

    root = tmp_path_factory.mktemp("predict")
    sample = write_sample_slide(root / "sample.tif", width=SIZE[0], height=SIZE[1], mpp=MPP, seed=7)
    model = save_random(root / "student")
    calls: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    pred = predict_slide(
        slide_path=sample.path, model_dir=model, out_dir=root / "out", device="cpu",
        features_dir=root / "features", batch_size=8, progress=lambda s, f: calls.append((s, f)),
    )
    first = time.perf_counter() - t0
    return {"root": root, "sample": sample, "model": model, "pred": pred, "calls": calls, "first": first}


def feature_files(world: dict) -> dict[str, Path]:
    base = world["root"] / "features" / "efficientnet-lite0"
    return {"10x": base / "10x" / "sample.h5", "20x": base / "20x" / "sample.h5"}


def test_bundle_written_and_reads_back(world: dict) -> None:
    out = world["root"] / "out"
    assert is_bundle_dir(out) and (out / "attention.geojson").is_file()
    back = read_bundle(out)
    assert back == world["pred"]
    pred = world["pred"]
    assert pred.slide_name == "sample.tif" and pred.level0_size == SIZE and pred.mpp == pytest.approx(MPP)
    assert pred.model_kind == "student" and pred.trained_for == "3-class test model"
    assert pred.class_names == CLASSES and pred.predicted_class in CLASSES
    assert sum(pred.probabilities) == pytest.approx(1.0, abs=1e-5)
    assert pred.tissue_contours  # tissue outline from the slide
    assert {"tissue", "read", "encode", "model", "total"} <= set(pred.timings)


def test_patch_table_matches_feature_files(world: dict) -> None:
    patches = world["pred"].patches
    for mag, path in feature_files(world).items():
        ff = read_features(path)
        rows = patches[patches["magnification"] == mag]
        assert len(rows) == ff.n_patches > 0
        np.testing.assert_array_equal(rows[["x", "y"]].to_numpy(), ff.coords)
        side = round(224 * (10 / float(mag[:-1])) / MPP)  # 896 px at 10x, 448 px at 20x
        assert (rows["width"] == side).all() and (rows["height"] == side).all()
        for column in ("tumor_attention", "tme_attention"):
            assert rows[column].sum() == pytest.approx(1.0, abs=1e-5)
            assert (rows[column] >= 0).all()
        assert set(rows["ita_cluster"]) <= {0, 1} and rows["ita_centre"].sum() == 2  # K = 2 centres
    w, h = SIZE
    assert (patches["x"] >= 0).all() and (patches["y"] >= 0).all()
    assert (patches["x"] + patches["width"] <= w).all() and (patches["y"] + patches["height"] <= h).all()


def test_progress_reported_in_order(world: dict) -> None:
    calls = world["calls"]
    stages = [s for s, _ in calls]
    assert stages[0] == "features" and stages[-1] == "model"
    assert "encode" in stages and calls[-1] == ("model", 1.0)
    encode = [f for s, f in calls if s == "encode"]
    assert encode == sorted(encode) and encode[-1] == pytest.approx(1.0)
    assert all(0.0 <= f <= 1.0 for _, f in calls)


def test_second_run_reuses_cached_features(world: dict) -> None:
    files = feature_files(world)
    stamps = {m: p.stat().st_mtime_ns for m, p in files.items()}
    t0 = time.perf_counter()
    again = predict_slide(slide_path=world["sample"].path, model_dir=world["model"], device="cpu",
                          features_dir=world["root"] / "features")
    elapsed = time.perf_counter() - t0
    assert again.timings["features_reused"] == 1.0 and again.timings["encode"] == 0.0
    assert {m: p.stat().st_mtime_ns for m, p in files.items()} == stamps
    assert elapsed < world["first"]
    assert again.probabilities == world["pred"].probabilities
    assert again.patches.equals(world["pred"].patches)


def test_features_give_the_same_prediction_as_the_slide(world: dict, tmp_path: Path) -> None:
    pred = world["pred"]
    from_files = predict_features(features=feature_files(world), model_dir=world["model"], device="cpu",
                                  out_dir=tmp_path / "b")
    assert from_files.probabilities == pred.probabilities
    assert from_files.patches.equals(pred.patches)
    assert (from_files.slide_id, from_files.level0_size) == (pred.slide_id, pred.level0_size)
    assert from_files.mpp == pytest.approx(pred.mpp)
    assert from_files.tissue_contours == []  # no pixels, no tissue outline
    assert read_bundle(tmp_path / "b") == from_files
    # magnification keys may be numbers too
    numeric = predict_features(features={10: feature_files(world)["10x"], 20.0: feature_files(world)["20x"]},
                               model_dir=world["model"], device="cpu")
    assert numeric.probabilities == pred.probabilities


def test_cancel_during_encoding_writes_nothing(world: dict, tmp_path: Path) -> None:
    polls = {"n": 0}

    def cancel() -> bool:
        polls["n"] += 1
        # polled before every encoder layer: cancel inside the 20x encoding, once 10x is written
        return any((tmp_path / "f").rglob("10x/*.h5"))

    t0 = time.perf_counter()
    with pytest.raises(Cancelled, match="cancelled"):
        predict_slide(slide_path=world["sample"].path, model_dir=world["model"], device="cpu",
                      out_dir=tmp_path / "b", features_dir=tmp_path / "f", batch_size=8, cancel=cancel)
    assert time.perf_counter() - t0 < world["first"]
    assert not (tmp_path / "b").exists()
    # a magnification finished before the cancel is kept (valid, reusable); none half-written
    written = sorted((tmp_path / "f").rglob("*.h5*"))
    assert [p.parent.name for p in written] == ["10x"]
    assert read_features(written[0]).n_patches == read_features(feature_files(world)["10x"]).n_patches


def test_abmil_and_survival_models(world: dict, tmp_path: Path) -> None:
    abmil = save_random(tmp_path / "abmil", kind="abmil")
    pred = predict_features(features=feature_files(world), model_dir=abmil, device="cpu")
    assert pred.model_kind == "abmil"
    np.testing.assert_array_equal(pred.patches["tumor_attention"], pred.patches["tme_attention"])
    assert (pred.patches["ita_cluster"] == -1).all() and not pred.patches["ita_centre"].any()

    extra = dict(EXTRA, class_names=None, bin_edges=[0.0, 10.0, 20.0, 40.0, float("inf")])
    surv = save_random(tmp_path / "surv", task="survival", n_outputs=4, extra=extra)
    pred = predict_features(features=feature_files(world), model_dir=surv, device="cpu", out_dir=tmp_path / "b")
    assert pred.task == "survival" and pred.class_names == [] and pred.probabilities is None
    assert len(pred.survival) == 4 and all(np.diff(pred.survival) <= 0)
    assert pred.risk == pytest.approx(-sum(pred.survival), rel=1e-5)
    assert read_bundle(tmp_path / "b").bin_edges == [0.0, 10.0, 20.0, 40.0, None]


def test_bundle_geojson_reads_back_inside_the_slide(world: dict) -> None:
    import json

    import shapely
    from shapely.geometry import shape

    doc = json.loads((world["root"] / "out" / "attention.geojson").read_text())
    kinds = {f["properties"]["kind"] for f in doc["features"]}
    assert kinds == {"attention_contour", "top_patch", "tissue"}
    slide = shapely.box(0, 0, *SIZE)
    for feature in doc["features"]:
        geom = shape(feature["geometry"])
        assert geom.is_valid and slide.buffer(1e-6).contains(geom)


@pytest.mark.slow
def test_real_cmu_slide(cmu_slide_path: Path, tmp_path: Path) -> None:
    """The real Aperio slide (0.499 µm/px, one level): 10x patches are 449 px at level 0."""
    model = save_random(tmp_path / "m")
    pred = predict_slide(slide_path=cmu_slide_path, model_dir=model, out_dir=tmp_path / "b", device="cpu",
                         features_dir=tmp_path / "f")
    assert read_bundle(tmp_path / "b") == pred
    assert pred.mpp == pytest.approx(0.499) and pred.level0_size == (2220, 2967)
    p = pred.patches
    assert set(p["magnification"]) == {"10x", "20x"}
    assert set(p.loc[p["magnification"] == "10x", "width"]) == {round(448 / 0.499 / 2)}
    assert ((p["x"] + p["width"]) <= 2220).all() and ((p["y"] + p["height"]) <= 2967).all()
    for mag in ("10x", "20x"):
        assert p.loc[p["magnification"] == mag, "tumor_attention"].sum() == pytest.approx(1.0, abs=1e-5)
