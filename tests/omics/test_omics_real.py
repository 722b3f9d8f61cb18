"""Real expression without a download: the 76-gene breast-cancer cohort shipped with
scikit-survival (GSE7390, 198 patients, Affymetrix HG-U133A, log2 values)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_dismm.errors import DataError
from napari_dismm.omics import ExpressionNormaliser, load_gene_sets, load_omics, read_expression
from tests.omics.test_omics_expression import write_gmt

datasets = pytest.importorskip("sksurv.datasets")


@pytest.fixture(scope="module")
def breast(tmp_path_factory):
    x, _ = datasets.load_breast_cancer()
    x = x.copy()
    x.index = [f"GSE7390_{i:03d}" for i in range(len(x))]
    x.index.name = "patient"
    path = tmp_path_factory.mktemp("bc") / "breast.tsv"
    x.to_csv(path, sep="\t")
    probes = [c for c in x.columns if c.endswith("_at")]
    return path, x, probes


def test_default_sets_cover_none_of_the_probe_columns(breast):
    path, x, probes = breast
    assert len(probes) == 76
    defaults = load_gene_sets()
    table = read_expression(path)  # every numeric column; er and grade are text
    assert len(table.columns) == 78  # 76 probes + age + size
    found = [g for g in defaults.genes if table.locate(g) is not None]
    assert found == []  # the columns are probe IDs, not symbols: 0 of 1343 default genes
    with pytest.raises(DataError, match="Affymetrix probe IDs"):
        load_omics(path)


def test_pipeline_runs_with_a_gmt_built_from_its_columns(breast, tmp_path):
    path, x, probes = breast
    half = len(probes) // 2
    gmt = write_gmt(tmp_path / "bc.gmt", {"TUMOR_PROBES_A": probes[:half], "TME_PROBES_B": probes[half:]})
    gene_sets, table = load_omics(path, gmt, log1p=False)  # GSE7390 values are already log2
    assert table.patients == tuple(x.index)
    assert len(gene_sets.tumor) == half and len(gene_sets.tme) == 76 - half

    train, test = list(x.index[:132]), list(x.index[132:])
    norm = ExpressionNormaliser(log1p=False).fit(table.select(train), gene_sets)
    out = table.vectors(test, norm)
    assert out["tumor"].shape == (66, half) and out["tme"].shape == (66, 76 - half)

    # independent computation with pandas on the training rows only
    cols = list(gene_sets.tumor) + list(gene_sets.tme)
    ref_train = x.loc[train, cols]
    expected = (x.loc[test, cols] - ref_train.mean()) / ref_train.std(ddof=0)
    np.testing.assert_allclose(np.hstack([out["tumor"], out["tme"]]), expected.to_numpy(), rtol=1e-4, atol=1e-5)
    # the held-out patients are not standardised to exactly 0/1: their own mean is not removed
    assert 0 < abs(float(np.hstack(list(out.values())).mean())) < 0.5

    # log1p=True also runs (values are positive), and the stored form reproduces it
    logged = ExpressionNormaliser().fit(table.select(train), gene_sets)
    again = ExpressionNormaliser.from_dict(logged.to_dict())
    np.testing.assert_array_equal(table.vectors(test, again)["tme"], table.vectors(test, logged)["tme"])
