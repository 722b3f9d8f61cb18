"""Bad data refused up front, naming the file: feature geometry in predict, every feature
file of a training cohort, gene sets whose TME side the overlap rule empties, extract's
numeric options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_dismm.cli import main
from napari_dismm.errors import DismmError, FeatureFileError
from napari_dismm.features.h5 import FeatureFile, write_features
from napari_dismm.predict import predict_features
from tests.test_predict import save_random


def feature_file(path: Path, *, coords=None, dim: int = 1280, n: int = 30, mag: float = 20.0,
                 features=None) -> Path:
    rng = np.random.default_rng(0)
    if coords is None:
        coords = np.stack(np.meshgrid(np.arange(6) * 448, np.arange(5) * 448), -1).reshape(-1, 2)[:n]
    coords = np.asarray(coords, dtype=np.int64)
    if features is None:
        features = rng.standard_normal((len(coords), dim)).astype(np.float32)
    write_features(path, FeatureFile(
        features=features, coords=coords, patch_size=224, patch_size_level0=448,
        target_magnification=mag, level0_magnification=40.0, name=path.stem, level0_width=3000,
        level0_height=2500, mpp=0.25, encoder="efficientnet-lite0", slide_id="abc",
    ))
    return path


@pytest.mark.parametrize(("coords", "says"), [
    (np.array([[-100000, 0], [0, 0], [448, 0]]), "negative coordinates"),
    (np.zeros((30, 2)), "29 of 30 patches repeat"),
    (np.array([[0, 0], [5000, 0]]), "outside the slide's 3000 x 2500 px"),
], ids=["negative", "all-duplicate", "outside"])
def test_predict_refuses_impossible_coordinates(tmp_path, capsys, coords, says):
    model = save_random(tmp_path / "m")
    path = feature_file(tmp_path / "bad.h5", coords=coords)
    with pytest.raises(FeatureFileError, match=says):
        predict_features(features={"20x": path}, model_dir=model, device="cpu")
    out = tmp_path / "bundle"
    assert main(["predict", str(path), "--model", str(model), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "bad.h5" in err and says in err and "Traceback" not in err
    assert not out.exists()


# -- every feature file of a training cohort, before the run directory exists ---------------

import h5py  # noqa: E402

from tests.training.synth_files import write_cohort  # noqa: E402


@pytest.fixture(scope="module")
def cohort_files(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("cohort"), n_patients=12, feature_dim=8)


def _rewrite(path: Path, **datasets) -> None:
    with h5py.File(path, "r") as h5:
        kept = {k: h5[k][()] for k in ("features", "coords")}
    kept.update(datasets)
    with h5py.File(path, "w") as h5:
        for key, value in kept.items():
            h5.create_dataset(key, data=value)


def _broken(kind: str, features: np.ndarray, coords: np.ndarray) -> dict:
    n = len(features)
    return {
        "nan": {"features": np.where(np.arange(n)[:, None] == 1, np.nan, features)},
        "n-mismatch": {"coords": coords[:-1]},
        "1-d": {"features": features[:, 0]},
        "string": {"features": np.array([["a"] * features.shape[1]] * n, dtype="S1")},
        "0-row": {"features": features[:0], "coords": coords[:0]},
        "narrow": {"features": features[:, :4]},
        "negative": {"coords": coords - 100000},
        "duplicate": {"coords": np.zeros_like(coords)},
    }[kind]


@pytest.mark.parametrize(("kind", "says"), [
    ("nan", "NaN"), ("n-mismatch", "coordinates"), ("1-d", "(N, D)"), ("string", "numeric"),
    ("0-row", "has no patch in any feature file"), ("narrow", "differ from the other 11 (8-d)"),
    ("negative", "negative coordinates"), ("duplicate", "repeat"),
])
def test_train_checks_every_feature_file_first(cohort_files, tmp_path, capsys, monkeypatch, kind, says):
    import pandas as pd

    frame = pd.read_csv(cohort_files.csv, dtype=str)
    root = tmp_path / "c"
    root.mkdir()
    for col in ("features_10x", "features_20x"):  # copies, so the module's cohort stays intact
        for i, rel in enumerate(frame[col]):
            src = cohort_files.root / rel
            dst = root / f"{col}_{i}.h5"
            dst.write_bytes(src.read_bytes())
            frame.loc[i, col] = dst.name
    victim = root / frame["features_20x"].iat[5]
    with h5py.File(victim, "r") as h5:
        features, coords = h5["features"][()], h5["coords"][()]
    _rewrite(victim, **_broken(kind, features, coords))
    if kind == "0-row":  # empty at both magnifications (empty at one only trains, with a warning)
        other = root / frame["features_10x"].iat[5]
        with h5py.File(other, "r") as h5:
            f10, c10 = h5["features"][()], h5["coords"][()]
        _rewrite(other, features=f10[:0], coords=c10[:0])
    frame.to_csv(root / "cohort.csv", index=False)
    out = tmp_path / "run"
    code = main(["train", "--cohort", str(root / "cohort.csv"), "--expression", str(cohort_files.expression),
                 "--gene-sets", str(cohort_files.gmt), "--task", "classification", "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert victim.name in err[0] and says in err[0], err[0]
    assert not out.exists()


def test_slide_empty_at_one_magnification_is_reported(cohort_files, tmp_path):
    from napari_dismm.errors import DismmWarning
    from training.cohort import load_cohort

    write_features(tmp_path / "empty.h5", FeatureFile(np.zeros((0, 8), np.float32), np.zeros((0, 2), np.int64)))
    import pandas as pd

    frame = pd.read_csv(cohort_files.csv, dtype=str)
    frame.loc[2, "features_20x"] = str(tmp_path / "empty.h5")
    frame.to_csv(cohort_files.root / "one_empty.csv", index=False)
    with pytest.warns(DismmWarning, match=r"1 slide\(s\) have no patch at one magnification.*\(row 4\) at 20x"):
        load_cohort(cohort_csv=cohort_files.root / "one_empty.csv", task="classification")


# -- gene sets -----------------------------------------------------------------------------


def test_gmt_whose_tme_equals_tumor_says_what_happened(tmp_path):
    from napari_dismm.omics import load_gene_sets

    gmt = tmp_path / "same.gmt"
    gmt.write_text("TUMOR_A\tna\tMYC\tMKI67\tEGFR\nTME_A\tna\tMYC\tMKI67\tEGFR\n")
    with pytest.raises(DismmError) as error:
        load_gene_sets(gmt)
    message = str(error.value)
    assert "\n" not in message
    assert "TME set(s) TME_A is also in a TUMOR set" in message and "moved all 3 to the tumor side" in message
    assert "ties to tumor" in message


# -- extract's numeric options: one up-front exit 2, not a failure per slide ------------------


@pytest.mark.parametrize(("option", "says"), [
    (["--magnifications", "0"], "--magnifications"), (["--magnifications", "ten"], "--magnifications"),
    (["--mpp", "-1"], "--mpp"), (["--mpp", "nan"], "--mpp"), (["--batch-size", "0"], "--batch-size"),
    (["--min-tissue", "2"], "--min-tissue"), (["--min-tissue", "-0.1"], "--min-tissue"),
    (["--workers", "-1"], "--workers"),
])
def test_extract_bad_numbers_exit_2_before_any_slide(tmp_path, capsys, cmu_slide_path, option, says):
    out = tmp_path / "features"
    assert main(["extract", str(cmu_slide_path), "--out", str(out), *option]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and says in err[0], err
    assert not out.exists()
