"""Property-based: random and mutated feature files, cohort CSVs, expression tables, GMT and
TOML files given to the readers and to `dismm` (in process). Whatever the input: no
traceback (only DismmError escapes a reader), and a refused input exits 2 with one line and
leaves no output behind. Example counts are small and derandomised so CI stays fast and
repeatable; raise them locally (HYPOTHESIS_PROFILE=deep) to search longer."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_dismm.cli import main
from napari_dismm.errors import DismmError

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("deep", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def one_line_exit_2(code: int, capsys, *outputs: Path) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1 and "Traceback" not in err[0] and err[0].startswith("dismm"), err
    for out in outputs:
        assert not out.exists(), f"{out} left behind"
    return err[0]


# -- text mutations -----------------------------------------------------------------------------

@st.composite
def mutated(draw, text: str) -> str:
    """``text`` after 1-3 random edits: cut, insert, replace a cell, duplicate or drop a line, truncate."""
    for _ in range(draw(st.integers(1, 3))):
        lines = text.split("\n")
        kind = draw(st.sampled_from(["cut", "insert", "cell", "dup", "drop", "truncate"]))
        if kind == "cut" and text:
            i = draw(st.integers(0, len(text) - 1))
            text = text[:i] + text[i + draw(st.integers(1, 40)):]
        elif kind == "insert":
            i = draw(st.integers(0, len(text)))
            junk = draw(st.sampled_from(["", ",", "\t", "\n", "nan", "-1", "inf", "1e400", "\"", "x" * 50, "é",
                                         "\x00", "TUMOR_X", "TME_Y", "[cv]", "=", "folds = 0"]))
            text = text[:i] + junk + text[i:]
        elif kind == "cell" and lines:
            row = draw(st.integers(0, len(lines) - 1))
            sep = "\t" if "\t" in lines[row] else ","
            cells = lines[row].split(sep)
            cells[draw(st.integers(0, len(cells) - 1))] = draw(st.sampled_from(["", "NA", "nan", "-5", "abc", "1e9"]))
            lines[row] = sep.join(cells)
            text = "\n".join(lines)
        elif kind == "dup" and lines:
            row = draw(st.integers(0, len(lines) - 1))
            text = "\n".join(lines[: row + 1] + [lines[row]] + lines[row + 1:])
        elif kind == "drop" and lines:
            row = draw(st.integers(0, len(lines) - 1))
            text = "\n".join(lines[:row] + lines[row + 1:])
        elif kind == "truncate":
            text = text[: draw(st.integers(0, len(text)))]
    return text


# -- a small valid cohort all mutations start from -----------------------------------------------

@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from tests.training.synth_files import write_cohort

    return write_cohort(tmp_path_factory.mktemp("fuzz"), n_patients=8, feature_dim=4)


def _train(cohort, *, csv=None, expression=None, gmt=None, config=None, out: Path) -> int:
    argv = ["train", "--cohort", str(csv or cohort.csv), "--expression", str(expression or cohort.expression),
            "--gene-sets", str(gmt or cohort.gmt), "--task", "classification", "--out", str(out)]
    if config is not None:
        argv += ["--config", str(config)]
    return main(argv)


def _reader_refuses(read) -> bool:
    """True when the reader refuses with a DismmError; any other exception fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            read()
        except DismmError:
            return True
    return False


KINDS = {"csv": "cohort.csv", "expression": "expression.tsv", "gmt": "sets.gmt"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_mutated_cohort_inputs(cohort, capsys, kind):
    from training.cohort import load_cohort

    original = (cohort.root / KINDS[kind]).read_text()

    @settings(settings.get_profile(PROFILE))
    @given(text=mutated(original))
    def check(text):
        with tempfile.TemporaryDirectory(dir=cohort.root) as tmp:  # inside the cohort: feature paths resolve
            path = Path(tmp) / KINDS[kind]
            path.write_text(text, encoding="utf-8", errors="surrogateescape")
            given_files = {kind: path}
            refused = _reader_refuses(lambda: load_cohort(
                cohort_csv=given_files.get("csv", cohort.csv),
                expression=given_files.get("expression", cohort.expression),
                gene_sets=given_files.get("gmt", cohort.gmt), task="classification", base_dir=cohort.root))
            if not refused:
                return  # a valid cohort would train: not this test's business
            csv = given_files.get("csv")
            if csv is not None:  # feature paths are relative to the CSV: keep it beside them
                csv = cohort.root / f".fuzz-{os.getpid()}.csv"
                csv.write_text(text, encoding="utf-8", errors="surrogateescape")
            out = Path(tmp) / "run"
            capsys.readouterr()
            try:
                code = _train(cohort, csv=csv, expression=given_files.get("expression"), gmt=given_files.get("gmt"),
                              out=out)
            finally:
                if csv is not None:
                    csv.unlink()
            one_line_exit_2(code, capsys, out)

    check()


# -- TOML -------------------------------------------------------------------------------------------

TOML_VALUES = st.one_of(st.integers(-3, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                        st.text(max_size=5), st.lists(st.integers(-1, 3), max_size=3))
SECTIONS = ["data", "model", "teacher", "student", "cv", "baselines", "nope"]
KEYS = ["d", "epochs", "lr", "folds", "batch_size", "magnifications", "dropout", "n_heads", "run", "select_on",
        "val_fraction", "typo"]


@st.composite
def toml_text(draw) -> str:
    from training.config import _toml_value

    lines = []
    for section in draw(st.lists(st.sampled_from(SECTIONS), max_size=3, unique=True)):
        lines.append(f"[{section}]")
        for key in draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True)):
            value = draw(TOML_VALUES)
            try:
                lines.append(f"{key} = {_toml_value(value)}")
            except TypeError:
                continue
    text = "\n".join(lines)
    return draw(st.one_of(st.just(text), mutated(text)))


def test_random_toml(cohort, capsys, tmp_path):
    from training.config import load_config

    @settings(settings.get_profile(PROFILE))
    @given(text=toml_text())
    def check(text):
        config = tmp_path / "cfg.toml"
        config.write_text(text, encoding="utf-8", errors="surrogateescape")
        if not _reader_refuses(lambda: load_config(config)):
            return
        out = tmp_path / "run"
        capsys.readouterr()
        one_line_exit_2(_train(cohort, config=config, out=out), capsys, out)

    check()


# -- feature files ----------------------------------------------------------------------------------

@st.composite
def feature_datasets(draw) -> dict:
    n = draw(st.integers(0, 6))
    d = draw(st.sampled_from([0, 1, 1280, 3]))
    kind = draw(st.sampled_from(["f4", "f8", "i4", "S1"]))
    features = np.random.default_rng(draw(st.integers(0, 9))).standard_normal((n, d))
    if draw(st.integers(0, 3)) == 0 and features.size:
        features.flat[draw(st.integers(0, features.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    features = features.astype("S1") if kind == "S1" else features.astype(kind)
    coords = np.stack([np.arange(n) * 448, np.zeros(n, int)], axis=1)
    # one fault at a time is the likeliest (several at once hide each other)
    coords_edit = draw(st.sampled_from(["ok"] * 6 + ["negative", "same", "short", "3cols", "float", "1d"]))
    coords = {"ok": coords, "negative": coords - 10**5, "same": np.zeros_like(coords), "short": coords[:-1],
              "3cols": np.zeros((n, 3), int), "float": coords + 0.5, "1d": coords[:, 0]}[coords_edit]
    data = {"features": features, "coords": coords}
    if draw(st.integers(0, 5)) == 0:
        data.pop(draw(st.sampled_from(["features", "coords"])))
    if draw(st.integers(0, 5)) == 0:
        data["features"] = data.get("features", features)[None]  # a batch axis
    return data


def test_random_feature_files(tmp_path, capsys):
    from napari_dismm.features.h5 import read_features, scan_features
    from tests.test_predict import save_random

    model = save_random(tmp_path / "model")

    @settings(settings.get_profile(PROFILE), max_examples=5 * settings.get_profile(PROFILE).max_examples)
    @given(datasets=feature_datasets(), raw=st.one_of(st.none(), st.none(), st.none(), st.binary(max_size=64)),
           attrs=st.dictionaries(st.sampled_from(["target_magnification", "patch_size_level0", "level0_width"]),
                                 st.one_of(st.integers(-5, 40), st.just("20x"), st.floats(allow_nan=True)),
                                 max_size=2))
    def check(datasets, raw, attrs):
        path = tmp_path / "f.h5"
        if raw is not None:
            path.write_bytes(raw)
        else:
            with h5py.File(path, "w") as h5:
                for key, value in datasets.items():
                    h5.create_dataset(key, data=value)
                if "coords" in h5:
                    h5["coords"].attrs.update(attrs)
        readable = not _reader_refuses(lambda: read_features(path))
        scanned = not _reader_refuses(lambda: scan_features(path))
        assert scanned <= readable  # the cohort check is at least as strict as the reader
        out = tmp_path / "bundle"
        capsys.readouterr()
        code = main(["predict", str(path), "--model", str(model), "--out", str(out), "--device", "cpu"])
        if code == 0:
            assert (out / "prediction.json").is_file()
            import shutil

            shutil.rmtree(out)
        else:
            one_line_exit_2(code, capsys, out)

    check()
