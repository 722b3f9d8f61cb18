"""ExpressionNormaliser: training-fold statistics, imputation, and the JSON round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_dismm.errors import DataError, DismmWarning, ModelConfigError
from napari_dismm.omics import ExpressionNormaliser, load_omics
from napari_dismm.omics.expression import ExpressionTable
from tests.omics.test_omics_expression import write_gmt, write_table


def table(patients, genes, values) -> ExpressionTable:
    return ExpressionTable(tuple(patients), tuple(genes), np.asarray(values, dtype=np.float64), source="mem")


TRAIN = table(["P1", "P2", "P3"], ["A", "B", "C"], [[0, 9, 5], [3, 99, 5], [8, 999, 5]])
TEST = table(["Q1"], ["C", "B", "A"], [[7, 4, 1]])  # other column order


def test_test_fold_uses_training_statistics_hand_computed():
    norm = ExpressionNormaliser().fit(TRAIN, {"tumor": ["A"], "tme": ["B", "C"]})
    assert norm.genes_ == ("A", "B", "C")
    la = np.log1p([0.0, 3.0, 8.0])
    lb = np.log1p([9.0, 99.0, 999.0])
    mean_a, std_a = la.mean(), np.sqrt(((la - la.mean()) ** 2).mean())  # population std
    mean_b, std_b = lb.mean(), np.sqrt(((lb - lb.mean()) ** 2).mean())
    expected = [[(np.log1p(1) - mean_a) / std_a, (np.log1p(4) - mean_b) / std_b, (np.log1p(7) - np.log1p(5)) / 1.0]]
    z = norm.transform(TEST)
    assert z.dtype == np.float32 and z.shape == (1, 3)
    np.testing.assert_allclose(z, expected, rtol=1e-6)
    # fitting on the test patient instead would give other numbers: the statistics are the train fold's
    assert not np.allclose(ExpressionNormaliser().fit(TEST, ["A", "B", "C"]).mean_, norm.mean_)


def test_zero_variance_gene_gets_std_one():
    norm = ExpressionNormaliser(log1p=False).fit(TRAIN, ["C"])
    assert norm.std_.tolist() == [1.0]
    np.testing.assert_allclose(norm.transform(TEST), [[2.0]])


def test_missing_gene_and_missing_values_are_reported_and_zero():
    norm = ExpressionNormaliser().fit(TRAIN, ["A", "B"])
    partial = table(["Q1", "Q2"], ["a"], [[3.0], [np.nan]])  # lower-case symbol, B absent, one NaN
    with pytest.warns(DismmWarning) as record:
        z = norm.transform(partial)
    messages = " | ".join(str(w.message) for w in record)
    assert "1 of 2 model genes are not in the table" in messages and ": B" in messages
    assert "1 missing value(s) imputed" in messages and "patient Q2" in messages
    assert z[:, 1].tolist() == [0.0, 0.0] and z[1, 0] == 0.0
    assert z[0, 0] == pytest.approx((np.log1p(3) - norm.mean_[0]) / norm.std_[0], rel=1e-6)


def test_gene_absent_from_training_is_dropped_with_warning():
    with pytest.warns(DismmWarning, match="1 of 3 genes have no value in the training table.*: Z"):
        norm = ExpressionNormaliser().fit(TRAIN, {"tumor": ["A", "Z"], "tme": ["B"]})
    assert norm.groups_ == {"tumor": ("A",), "tme": ("B",)}
    with pytest.raises(DataError, match="no gene of group"), pytest.warns(DismmWarning):
        ExpressionNormaliser().fit(TRAIN, {"tumor": ["Z"], "tme": ["B"]})
    with pytest.raises(DataError, match="more than once"):
        ExpressionNormaliser().fit(TRAIN, {"tumor": ["A"], "tme": ["A", "B"]})


def test_negative_input_with_log1p_is_an_error():
    logged = table(["P1", "P2"], ["A"], [[-1.5], [2.0]])
    with pytest.raises(DataError, match="negative value -1.5 .*already log-transformed.*log1p=False"):
        ExpressionNormaliser().fit(logged, ["A"])
    z = ExpressionNormaliser(log1p=False).fit_transform(logged, ["A"])
    np.testing.assert_allclose(z.ravel(), [-1, 1])


def test_round_trip_through_json():
    norm = ExpressionNormaliser().fit(TRAIN, {"tumor": ["A"], "tme": ["B", "C"]})
    text = json.dumps(norm.to_dict())
    again = ExpressionNormaliser.from_dict(json.loads(text))
    assert again.groups_ == norm.groups_ and again.log1p is True
    np.testing.assert_array_equal(again.transform(TEST), norm.transform(TEST))
    assert isinstance(json.loads(text)["mean"], list)


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.pop("std"),
        lambda d: d.update(extra=1),
        lambda d: d.update(std=d["std"][:-1]),
        lambda d: d.update(std=[0.0, 1.0, 1.0]),
        lambda d: d.update(mean=[float("nan"), 0.0, 0.0]),
        lambda d: d.update(version=99),
        lambda d: d.update(groups={"tumor": "A"}),
    ],
)
def test_malformed_config_is_a_model_config_error(change):
    data = ExpressionNormaliser().fit(TRAIN, {"tumor": ["A"], "tme": ["B", "C"]}).to_dict()
    change(data)
    with pytest.raises(ModelConfigError):
        ExpressionNormaliser.from_dict(data)


def test_unfitted_use_is_refused():
    with pytest.raises(RuntimeError, match="before fit"):
        ExpressionNormaliser().transform(TRAIN)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(0, 1e5, allow_nan=False), min_size=3, max_size=3), min_size=2, max_size=12
    )
)
def test_training_data_is_standardised(rows):
    t = table([f"P{i}" for i in range(len(rows))], ["A", "B", "C"], rows)
    z = ExpressionNormaliser().fit_transform(t, ["A", "B", "C"]).astype(np.float64)
    spread = np.log1p(np.asarray(rows)).std(axis=0)
    for j in range(3):
        assert abs(z[:, j].mean()) < 1e-4
        if spread[j] > 1e-3:
            assert z[:, j].std() == pytest.approx(1.0, abs=1e-3)


def test_vectors_split_tumor_and_tme_end_to_end(tmp_path):
    gmt = write_gmt(tmp_path / "s.gmt", {"TUMOR_P": ["MKI67", "TOP2A"], "TME_I": ["CD8A", "PTPRC", "GPR124"]})
    ids = [f"TCGA-AA-{i:04d}-01A" for i in range(6)]
    rng = np.random.default_rng(0)
    values = rng.gamma(2.0, 20.0, size=(6, 5)).round(3)
    path = write_table(tmp_path / "t.tsv", ids, ["MKI67", "TOP2A", "CD8A", "PTPRC", "ADGRA2"], values)
    gene_sets, expr = load_omics(path, gmt)
    train, test = [p[:12] for p in ids[:4]], [p[:12] for p in ids[4:]]
    norm = ExpressionNormaliser().fit(expr.select(train), gene_sets)
    out = expr.vectors(test, norm)
    assert out["tumor"].shape == (2, 2) and out["tme"].shape == (2, 3)
    assert norm.groups_["tme"] == ("ADGRA2", "CD8A", "PTPRC")
    ordered = values[:, [0, 1, 4, 2, 3]]  # MKI67 TOP2A | ADGRA2 CD8A PTPRC (sorted per subspace)
    log_train = np.log1p(ordered[:4])
    expected = (np.log1p(ordered[4:]) - log_train.mean(0)) / log_train.std(0)
    np.testing.assert_allclose(np.hstack([out["tumor"], out["tme"]]), expected, rtol=1e-5)
    with pytest.raises(DataError, match="tumor and TME"):
        expr.vectors(test, ExpressionNormaliser().fit(expr, ["MKI67"]))


def test_round_trip_does_not_depend_on_json_key_order():
    """A JSON writer that sorts keys (tme before tumor) must not swap the statistics."""
    rng = np.random.default_rng(0)
    genes = {"tumor": ["T1", "T2", "T3"], "tme": ["E1", "E2"]}
    values = np.exp(rng.normal([1, 2, 3, 6, 9], 0.5, size=(20, 5)))
    data = table([f"P{i}" for i in range(20)], genes["tumor"] + genes["tme"], values)
    norm = ExpressionNormaliser().fit(data, genes)
    again = ExpressionNormaliser.from_dict(json.loads(json.dumps(norm.to_dict(), sort_keys=True)))
    np.testing.assert_allclose(again.transform(data), norm.transform(data), atol=1e-6)
    vectors = data.vectors([f"P{i}" for i in range(20)], again)
    assert vectors["tumor"].shape == (20, 3) and abs(vectors["tme"].mean()) < 1e-5
