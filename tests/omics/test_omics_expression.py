"""Expression tables: orientation, TCGA barcodes, symbols and aliases, and clear errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from napari_dismm.errors import DataError, DismmWarning
from napari_dismm.omics import load_omics, read_expression
from napari_dismm.omics.expression import GENES_X_PATIENTS, PATIENTS_X_GENES
from napari_dismm.omics.patients import patient_id, sample_kind


def write_table(path: Path, ids, genes, values, *, sep="\t", first="id") -> Path:
    lines = [sep.join([first, *genes])]
    for i, row in zip(ids, values):
        lines.append(sep.join([i, *("" if v is None else str(v) for v in row)]))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_gmt(path: Path, sets: dict[str, list[str]]) -> Path:
    path.write_text("".join(f"{name}\tdesc\t" + "\t".join(genes) + "\n" for name, genes in sets.items()))
    return path


@pytest.fixture
def small_gmt(tmp_path) -> Path:
    return write_gmt(tmp_path / "sets.gmt", {"TUMOR_P": ["MKI67", "TOP2A", "MYC"], "TME_I": ["CD8A", "PTPRC", "GPR124"]})


# -- ids -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sample", "patient", "kind"),
    [
        ("TCGA-02-0001-01A-01R", "TCGA-02-0001", "tumor"),
        ("tcga-02-0001-11A", "TCGA-02-0001", "normal"),
        ("TCGA-DU-A5TW", "TCGA-DU-A5TW", "unknown"),
        ("TCGA-06-0125-20A", "TCGA-06-0125", "control"),
        ("patient_7", "patient_7", "unknown"),
        ("  P1 ", "P1", "unknown"),
    ],
)
def test_tcga_barcodes(sample, patient, kind):
    assert patient_id(sample) == patient
    assert sample_kind(sample) == kind


def test_patients_x_genes_with_barcodes_averaged(tmp_path):
    ids = ["TCGA-02-0001-01A-01R", "TCGA-02-0001-01B-02R", "TCGA-02-0001-11A-01R", "TCGA-02-0002-01A-01R"]
    values = [[1, 10], [3, None], [100, 100], [5, 6]]
    table = read_expression(write_table(tmp_path / "t.tsv", ids, ["MKI67", "CD8A"], values), genes=["MKI67", "CD8A"])
    assert table.orientation == PATIENTS_X_GENES
    assert table.patients == ("TCGA-02-0001", "TCGA-02-0002")
    # two tumour samples averaged (NaN-aware), the normal (11A) left out
    np.testing.assert_allclose(table.values, [[2, 10], [5, 6]])
    report = " ".join(table.report)
    assert "TCGA-02-0001-11A-01R" in report and "averaged for 1 patient" in report
    # the cohort's barcodes select patients by their first 12 characters
    sel = table.select(["TCGA-02-0002-01A-99X", "tcga-02-0001"])
    assert sel.patients == ("TCGA-02-0002", "TCGA-02-0001")
    with pytest.raises(DataError, match="1 patient.*TCGA-99-9999"):
        table.select(["TCGA-02-0001", "TCGA-99-9999"])


def test_genes_x_patients_detected_and_annotation_column_ignored(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(
        "Hugo_Symbol\tEntrez_Gene_Id\tTCGA-02-0001-01A\tTCGA-02-0002-01A\n"
        "mki67\t4288\t1.5\t2.5\n"  # case-insensitive
        "CD8A|925\t925\t3\t4\n"  # TCGA legacy SYMBOL|ENTREZ
        "UNRELATED\t1\t0\t0\n"
    )
    table = read_expression(path, genes=["MKI67", "CD8A", "PTPRC"])
    assert table.orientation == GENES_X_PATIENTS
    assert "annotation columns ignored: Entrez_Gene_Id" in table.report
    assert table.patients == ("TCGA-02-0001", "TCGA-02-0002")
    np.testing.assert_allclose(table.gene_values(["MKI67", "CD8A", "PTPRC"]), [[1.5, 3, np.nan], [2.5, 4, np.nan]])
    assert table.missing(["MKI67", "PTPRC"]) == ["PTPRC"]


def test_hgnc_renames_match_both_ways(tmp_path):
    # an old table (GPR124, FYB) against current symbols, and a current table against old ones
    old = read_expression(write_table(tmp_path / "old.tsv", ["P1"], ["GPR124", "FYB"], [[1, 2]]), genes=["ADGRA2", "FYB1"])
    np.testing.assert_allclose(old.gene_values(["ADGRA2", "FYB1"]), [[1, 2]])
    new = read_expression(write_table(tmp_path / "new.tsv", ["P1"], ["CCN4", "TENM4"], [[3, 4]]), genes=["WISP1", "ODZ4"])
    np.testing.assert_allclose(new.gene_values(["WISP1", "ODZ4"]), [[3, 4]])


def test_csv_and_gzip(tmp_path):
    csv = write_table(tmp_path / "t.csv", ["A", "B"], ["MKI67", "CD8A"], [[1, 2], [3, 4]], sep=",")
    gz = tmp_path / "t.tsv.gz"
    gz.write_bytes(gzip.compress(write_table(tmp_path / "x.tsv", ["A", "B"], ["MKI67", "CD8A"], [[1, 2], [3, 4]]).read_bytes()))
    for path in (csv, gz):
        np.testing.assert_allclose(read_expression(path, genes=["CD8A"]).values, [[2], [4]])


def test_without_genes_keeps_numeric_columns(tmp_path):
    path = write_table(tmp_path / "t.tsv", ["P1", "P2"], ["G1", "er", "G2"], [[1, "positive", 2], [3, "negative", 4]])
    table = read_expression(path)
    assert table.columns == ("G1", "G2")
    assert any("non-numeric columns ignored: er" in r for r in table.report)


# -- errors ---------------------------------------------------------------------------------
def test_duplicated_ids_and_genes(tmp_path):
    with pytest.raises(DataError, match="duplicated sample ids: P1"):
        read_expression(write_table(tmp_path / "a.tsv", ["P1", "P2", "P1"], ["MKI67"], [[1], [2], [3]]), genes=["MKI67"])
    with pytest.raises(DataError, match="more than once.*MKI67"):
        read_expression(write_table(tmp_path / "b.tsv", ["P1"], ["MKI67", "mki67"], [[1, 2]]), genes=["MKI67"])
    with pytest.raises(DataError, match="more than once"):  # old and new symbol of one gene
        read_expression(write_table(tmp_path / "c.tsv", ["P1"], ["GPR124", "ADGRA2"], [[1, 2]]), genes=["ADGRA2"])
    path = tmp_path / "d.tsv"  # genes x patients with a repeated sample column
    path.write_text("gene\tS1\tS1\nMKI67\t1\t2\n")
    with pytest.raises(DataError, match="duplicated sample ids: S1"):
        read_expression(path, genes=["MKI67"])


def test_negative_values_with_log1p(tmp_path, small_gmt):
    path = write_table(tmp_path / "z.tsv", ["P1", "P2"], ["MKI67", "CD8A"], [[-0.7, 1.2], [0.7, -1.2]])
    with pytest.raises(DataError, match=r"negative value -1\.2 .*already log-transformed or z-scored.*--no-log1p"):
        with pytest.warns(DismmWarning):
            load_omics(path, small_gmt)
    with pytest.warns(DismmWarning, match="not in the table"):
        gene_sets, table = load_omics(path, small_gmt, log1p=False)
    assert table.patients == ("P1", "P2")


def test_ensembl_and_probe_columns_are_named(tmp_path, small_gmt):
    ens = write_table(tmp_path / "e.tsv", ["P1"], ["ENSG00000148773.14", "ENSG00000153563.16"], [[1, 2]])
    with pytest.raises(DataError, match=r"look like Ensembl gene IDs \(ENSG\.\.\.\).*no\s+mapping ships offline"):
        load_omics(ens, small_gmt)
    ens_t = tmp_path / "et.tsv"  # genes x patients form
    ens_t.write_text("gene_id\tTCGA-02-0001\nENSG00000148773.14\t1\nENSG00000153563\t2\n")
    with pytest.raises(DataError, match="Ensembl"):
        read_expression(ens_t, genes=["MKI67"])
    probes = write_table(tmp_path / "p.tsv", ["P1"], ["X200726_at", "X201091_s_at"], [[1, 2]])
    with pytest.raises(DataError, match="Affymetrix probe IDs"):
        load_omics(probes, small_gmt)
    plain = write_table(tmp_path / "q.tsv", ["P1"], ["FOO", "BAR"], [[1, 2]])
    with pytest.raises(DataError, match="HGNC symbols in the header row or first column"):
        load_omics(plain, small_gmt)


def test_not_a_table(tmp_path, small_gmt, cmu_slide_path):
    with pytest.raises(DataError, match="binary file"):
        read_expression(cmu_slide_path, genes=["MKI67"])
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(DataError, match="not a readable TSV/CSV"):
        read_expression(tmp_path / "empty.tsv")
    (tmp_path / "one.tsv").write_text("id\nP1\nP2\n")
    with pytest.raises(DataError, match="need an id column"):
        read_expression(tmp_path / "one.tsv")
    # a GMT file passed as the expression table: its genes are found, its values are not numbers
    with pytest.raises(DataError, match="non-numeric value.*is this an expression table"):
        read_expression(small_gmt, genes=["MKI67", "TOP2A", "CD8A"])
    with pytest.raises(DataError, match="not found"):
        read_expression(tmp_path / "missing.tsv")
    with pytest.raises(DataError, match="not a file"):
        read_expression(tmp_path)


def test_mostly_missing_and_infinite(tmp_path):
    values = [[1, None, None], [None, None, 2], [None, 3, None]]
    with pytest.raises(DataError, match="67% of the values are missing"):
        read_expression(write_table(tmp_path / "n.tsv", ["P1", "P2", "P3"], ["A", "B", "C"], values), genes=["A", "B", "C"])
    with pytest.raises(DataError, match="infinite value.*'B'"):
        read_expression(write_table(tmp_path / "i.tsv", ["P1"], ["A", "B"], [[1, "inf"]]), genes=["A", "B"])


def test_subspace_without_any_gene_is_an_error(tmp_path, small_gmt):
    path = write_table(tmp_path / "t.tsv", ["P1", "P2"], ["MKI67", "TOP2A"], [[1, 2], [3, 4]])
    with pytest.raises(DataError, match="none of the 3 tme genes"), pytest.warns(DismmWarning, match="MYC"):
        load_omics(path, small_gmt)
