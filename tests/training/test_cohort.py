"""Cohort loading: what a valid cohort gives, and one clear DataError line per problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_dismm.errors import DataError
from tests.training.synth_files import CohortFiles, variant, write_cohort
from training.cohort import load_cohort


@pytest.fixture(scope="module")
def cls_files(tmp_path_factory) -> CohortFiles:
    return write_cohort(tmp_path_factory.mktemp("cls"), task="classification", n_patients=12)


@pytest.fixture(scope="module")
def surv_files(tmp_path_factory) -> CohortFiles:
    return write_cohort(tmp_path_factory.mktemp("surv"), task="survival", n_patients=12)


def _load(files: CohortFiles, csv: Path | None = None, **kw):
    kw.setdefault("task", "classification")
    kw.setdefault("gene_sets", files.gmt)
    return load_cohort(cohort_csv=csv or files.csv, expression=files.expression, **kw)


def _error(files: CohortFiles, name: str, edit, **kw) -> str:
    with pytest.raises(DataError) as info:
        _load(files, variant(files, name, edit), **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- valid cohorts ----------------------------------------------------------------------------


def test_valid_classification_cohort(cls_files):
    cohort = _load(cls_files)
    synth = cls_files.synth
    assert cohort.task == "classification"
    assert cohort.class_names == tuple(sorted(synth.class_names))
    assert cohort.patients == tuple(p.patient_id for p in synth.patients)
    assert len(cohort.slides) == 12
    for slide, patient in zip(cohort.slides, synth.patients):
        assert cohort.class_names[slide.class_index] == synth.class_names[patient.label]
        assert slide.features["10x"].is_file() and slide.features["10x"].is_absolute()
    assert cohort.gene_sets.tumor == synth.tumor_genes and cohort.gene_sets.tme == synth.tme_genes
    assert set(cohort.expression.patients) == set(cohort.patients)
    assert cohort.strata() == {s.patient_id: s.class_index for s in cohort.slides}


def test_valid_survival_cohort(surv_files):
    cohort = _load(surv_files, task="survival")
    times, events = cohort.survival(cohort.patients)
    np.testing.assert_allclose(times, [p.time for p in surv_files.synth.patients])
    np.testing.assert_array_equal(events, [p.event for p in surv_files.synth.patients])
    assert cohort.strata() == dict(zip(cohort.patients, events.tolist()))
    assert cohort.class_names == ()


def test_several_slides_per_patient_and_tcga_barcodes(tmp_path):
    files = write_cohort(tmp_path, n_patients=8, slides_per_patient=2, barcodes=True)
    cohort = _load(files)
    assert len(cohort.slides) == 16 and len(cohort.patients) == 8
    assert [s.slide_id for s in cohort.slides_of([cohort.patients[0]])] == [
        f"{cohort.patients[0]}-S0",
        f"{cohort.patients[0]}-S1",
    ]
    # the table holds sample barcodes (...-01A); they are matched to patients by 12 characters
    assert cohort.expression.patients[0] == "TCGA-SY-0001"


def test_sample_barcodes_in_the_cohort_csv_are_reduced_to_patients(cls_files):
    csv = variant(cls_files, "barcodes", lambda f: f.assign(patient_id=f.patient_id + "-01A-11R"))
    cohort = _load(cls_files, csv)
    assert cohort.patients[0] == "TCGA-SY-0001"


def test_numeric_labels_sort_by_value_and_stay_strings(cls_files):
    csv = variant(cls_files, "numeric", lambda f: f.assign(label=[str([2, 10, 1][i % 3]) for i in range(len(f))]))
    cohort = _load(cls_files, csv)
    assert cohort.class_names == ("1", "2", "10")
    assert cohort.slides[1].label == "10" and cohort.slides[1].class_index == 2


def test_without_expression_the_cohort_is_wsi_only(cls_files):
    cohort = load_cohort(cohort_csv=cls_files.csv, task="classification")
    assert cohort.expression is None and cohort.gene_sets is None


def test_base_dir_overrides_the_csv_folder(cls_files, tmp_path):
    moved = tmp_path / "elsewhere.csv"
    moved.write_text(cls_files.csv.read_text())
    with pytest.raises(DataError, match="feature file"):
        load_cohort(cohort_csv=moved, task="classification")
    cohort = load_cohort(cohort_csv=moved, task="classification", base_dir=cls_files.root)
    assert cohort.slides[0].features["20x"].parent.parent.parent == cls_files.root


# -- validation errors ------------------------------------------------------------------------


def test_missing_column(cls_files):
    message = _error(cls_files, "nocol", lambda f: f.drop(columns=["features_20x"]))
    assert "missing column(s) features_20x" in message


def test_survival_needs_time_and_event(cls_files):
    message = _error(cls_files, "nosurv", lambda f: f, task="survival")
    assert "missing column(s) time, event" in message


def test_duplicated_slide_ids(cls_files):
    def dup(f):
        f.loc[3, "slide_id"] = f.loc[2, "slide_id"]
        return f

    message = _error(cls_files, "dup", dup)
    assert "duplicated slide id(s): TCGA-SY-0003-S0" in message


def test_nan_label_names_the_slide(cls_files):
    def nan(f):
        f.loc[4, "label"] = np.nan
        return f

    message = _error(cls_files, "nanlabel", nan)
    assert "'label'" in message and "TCGA-SY-0005-S0 (row 6)" in message


@pytest.mark.parametrize(("column", "value"), [("time", "NaN"), ("event", ""), ("time", "soon")])
def test_bad_survival_cells(surv_files, column, value):
    def bad(f):
        f[column] = f[column].astype(object)
        f.loc[1, column] = value
        return f

    message = _error(surv_files, f"bad_{column}", bad, task="survival")
    assert repr(column) in message and "TCGA-SY-0002-S0" in message


def test_missing_feature_files_listed_up_to_five_with_count(cls_files):
    def gone(f):
        f["features_10x"] = [f"nowhere/{i}.h5" for i in range(len(f))]
        return f

    message = _error(cls_files, "gone", gone)
    assert message.count("nowhere/") == 5
    assert "12 feature file(s) not found" in message and "(12 in all)" in message


def test_label_with_one_class(cls_files):
    message = _error(cls_files, "oneclass", lambda f: f.assign(label="GBM"))
    assert "one class ('GBM')" in message


def test_all_censored(surv_files):
    message = _error(surv_files, "censored", lambda f: f.assign(event="0"), task="survival")
    assert "every event is 0" in message


def test_negative_time(surv_files):
    def neg(f):
        f.loc[0, "time"] = "-3"
        return f

    message = _error(surv_files, "negtime", neg, task="survival")
    assert "negative survival time" in message and "TCGA-SY-0001-S0" in message


def test_event_not_binary(surv_files):
    message = _error(surv_files, "event2", lambda f: f.assign(event="2"), task="survival")
    assert "0 (censored) or 1" in message


def test_unknown_patients_are_listed(cls_files):
    def stranger(f):
        f.loc[0, "patient_id"] = "TCGA-ZZ-9999"
        f.loc[1, "patient_id"] = "PATIENT-X"
        return f

    message = _error(cls_files, "stranger", stranger)
    assert "2 patient(s) not in the expression table" in message
    assert "TCGA-ZZ-9999, PATIENT-X" in message


def test_slides_of_one_patient_must_agree_on_the_label(cls_files):
    def conflict(f):
        f.loc[1, "patient_id"] = f.loc[0, "patient_id"]
        f.loc[1, "label"] = "something else"
        return f

    message = _error(cls_files, "conflict", conflict)
    assert "disagree" in message and "TCGA-SY-0001" in message


def test_unknown_task_and_missing_csv(cls_files, tmp_path):
    with pytest.raises(DataError, match="task must be one of"):
        _load(cls_files, task="regression")
    with pytest.raises(DataError, match="cohort CSV not found"):
        _load(cls_files, tmp_path / "absent.csv")
    empty = tmp_path / "empty.csv"
    pd.DataFrame(columns=["patient_id", "slide_id"]).to_csv(empty, index=False)
    with pytest.raises(DataError, match="no rows"):
        _load(cls_files, empty)


def test_gene_sets_given_as_an_object_select_the_table_columns(cls_files):
    from napari_dismm.omics import load_gene_sets

    sets = load_gene_sets(cls_files.gmt)
    cohort = _load(cls_files, gene_sets=sets)
    assert cohort.gene_sets is sets
    assert set(cohort.expression.columns) == set(sets.genes)
