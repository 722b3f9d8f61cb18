"""Patient-level splits: disjoint parts, one test fold per patient, balanced strata,
determinism, and the JSON round trip used to resume runs."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from napari_dismm.errors import DataError, DismmWarning
from tests.training.synth_files import write_cohort
from training.cohort import load_cohort
from training.splits import Split, load_or_make_split, make_split, split_cohort


def _patients(n: int, n_classes: int, seed: int = 0) -> tuple[list[str], dict[str, int]]:
    rng = np.random.default_rng(seed)
    ids = [f"P{i:03d}" for i in range(n)]
    strata = {p: int(c) for p, c in zip(ids, rng.integers(0, n_classes, n))}
    return ids, strata


CASES = [(30, 2, 3, 0.2), (47, 4, 5, 0.25), (23, 3, 2, 0.2), (12, 2, 4, 0.3)]


@pytest.mark.parametrize(("n", "n_classes", "folds", "val_fraction"), CASES)
def test_split_properties(n, n_classes, folds, val_fraction):
    ids, strata = _patients(n, n_classes, seed=n)
    split = make_split(patients=ids, strata=strata, n_folds=folds, val_fraction=val_fraction, seed=3)
    assert split.n_folds == folds
    # every patient in exactly one test fold
    tests = Counter(p for f in split.folds for p in f.test)
    assert set(tests) == set(ids) and set(tests.values()) == {1}
    classes = sorted(set(strata.values()))
    per_fold = np.array([[sum(strata[p] == c for p in f.test) for c in classes] for f in split.folds])
    # each class spread over the test folds within +-1
    assert (per_fold.max(axis=0) - per_fold.min(axis=0) <= 1).all(), per_fold
    for f in split.folds:
        train, val, test = set(f.train), set(f.val), set(f.test)
        assert not (train & val or train & test or val & test)
        assert train | val | test == set(ids)
        # validation: the asked share of the training patients, stratified within +-1 per class
        pool = len(train) + len(val)
        assert len(val) == max(1, round(val_fraction * pool))
        for c in classes:
            in_pool = sum(strata[p] == c for p in train | val)
            in_val = sum(strata[p] == c for p in val)
            assert abs(in_val - len(val) * in_pool / pool) < 1 + 1e-9
            if in_pool >= 1:
                assert sum(strata[p] == c for p in train) >= 1  # every class keeps a training patient


def test_deterministic_with_the_seed_and_independent_of_row_order():
    ids, strata = _patients(40, 3)
    a = make_split(patients=ids, strata=strata, n_folds=4, val_fraction=0.2, seed=7)
    b = make_split(patients=ids[::-1], strata=strata, n_folds=4, val_fraction=0.2, seed=7)
    c = make_split(patients=ids, strata=strata, n_folds=4, val_fraction=0.2, seed=8)
    assert a == b
    assert a != c


def test_json_round_trip(tmp_path):
    ids, strata = _patients(20, 2)
    split = make_split(patients=ids, strata=strata, n_folds=3, val_fraction=0.2, seed=1)
    path = split.save(tmp_path / "split.json")
    data = json.loads(path.read_text())
    assert data["folds"][0]["test"] == list(split.folds[0].test)
    assert Split.load(path) == split


def test_corrupted_split_file_is_rejected(tmp_path):
    ids, strata = _patients(20, 2)
    data = make_split(patients=ids, strata=strata, n_folds=3, val_fraction=0.2, seed=1).to_dict()
    data["folds"][1]["test"].append(data["folds"][0]["test"][0])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="more than one test fold"):
        Split.load(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="not a JSON split file"):
        Split.load(path)


def test_survival_cohort_stratifies_by_event_and_resumes(tmp_path):
    files = write_cohort(tmp_path / "c", task="survival", n_patients=16)
    cohort = load_cohort(cohort_csv=files.csv, task="survival")
    path = tmp_path / "run" / "split.json"
    first = load_or_make_split(path, cohort=cohort, n_folds=3, val_fraction=0.2, seed=0)
    assert first.stratify_by == "event" and path.is_file()
    events = cohort.strata()
    per_fold = [sum(events[p] for p in f.test) for f in first.folds]
    assert max(per_fold) - min(per_fold) <= 1
    # a resumed run reuses the file, even if the seed of a fresh split would differ
    path.write_text(path.read_text())
    again = load_or_make_split(path, cohort=cohort, n_folds=3, val_fraction=0.2, seed=0)
    assert again == first == split_cohort(cohort, n_folds=3, val_fraction=0.2, seed=0)
    with pytest.raises(DataError, match=r"other settings: n_folds 3 \(file\) vs 4"):
        load_or_make_split(path, cohort=cohort, n_folds=4, val_fraction=0.2, seed=0)


def test_split_of_another_cohort_is_an_error(tmp_path):
    files = write_cohort(tmp_path / "c", n_patients=12)
    cohort = load_cohort(cohort_csv=files.csv, task="classification")
    ids, strata = _patients(12, 2)
    path = make_split(patients=ids, strata=strata, n_folds=3, val_fraction=0.2, seed=0).save(tmp_path / "s.json")
    with pytest.raises(DataError, match="does not match the cohort: 12 patient"):
        load_or_make_split(path, cohort=cohort, n_folds=3, val_fraction=0.2, seed=0)


def test_bad_requests():
    ids, strata = _patients(10, 2)
    with pytest.raises(DataError, match="n_folds >= 2"):
        make_split(patients=ids, strata=strata, n_folds=1, val_fraction=0.2, seed=0)
    with pytest.raises(DataError, match="val_fraction"):
        make_split(patients=ids, strata=strata, n_folds=3, val_fraction=1.0, seed=0)
    with pytest.raises(DataError, match="cannot make 12 folds"):
        make_split(patients=ids, strata=strata, n_folds=12, val_fraction=0.2, seed=0)
    with pytest.raises(DataError, match="unique"):
        make_split(patients=ids + ids[:1], strata=strata, n_folds=3, val_fraction=0.2, seed=0)
    rare = dict(strata, P000=5)
    with pytest.warns(DismmWarning, match=r"value\(s\) \[5\] have fewer patients"):
        make_split(patients=ids, strata=rare, n_folds=3, val_fraction=0.2, seed=0)
