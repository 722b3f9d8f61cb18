"""Gene sets: GMT parsing, subspace assignment, the overlap rule, the shipped defaults."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest

from napari_dismm.errors import DataError, DismmWarning
from napari_dismm.omics import build_gene_sets, default_gene_sets_path, load_gene_sets, read_gmt
from napari_dismm.omics.gmt import GeneSet, parse_gmt
from napari_dismm.omics.symbols import ESTIMATE_RENAMES, identifier_kind
from tests.conftest import GENESETS

REPO = Path(__file__).resolve().parents[2]
HALLMARK_TUMOR = ("HALLMARK_E2F_TARGETS", "HALLMARK_G2M_CHECKPOINT", "HALLMARK_MYC_TARGETS_V1")
# SOURCES.md: tumour Hallmark sets and Hallmark TME sets share these 20 genes; TGFB1 is also
# in ESTIMATE's ImmuneSignature.
SHARED_20 = set(
    "ABCE1 BCL3 BRCA1 CDKN1A CDKN2A EIF3D EIF3J HIF1A MCM7 MT2A MTHFD2 MYC NME1 NOTCH2 NPM1 "
    "PML PSMA2 PSMB2 SLC7A1 TGFB1".split()
)


@pytest.fixture(scope="module")
def shared_genesets() -> Path:
    if not (GENESETS / "hallmark_selected.gmt").exists():
        pytest.skip(f"shared gene sets not found at {GENESETS}")
    return GENESETS


# -- parsing ------------------------------------------------------------------------------
def test_shared_files_parse_with_documented_sizes(shared_genesets):
    selected = read_gmt(shared_genesets / "hallmark_selected.gmt")
    estimate = read_gmt(shared_genesets / "estimate_si_geneset.gmt")
    full = read_gmt(shared_genesets / "h.all.v2024.1.Hs.symbols.gmt")
    assert [len(s.genes) for s in selected] == [200] * 7 + [36]
    assert {s.name: len(s.genes) for s in estimate} == {"StromalSignature": 141, "ImmuneSignature": 141}
    assert len(full) == 50
    assert sum(len(s.genes) for s in full) == 7322
    # each selected line is the same set as in the full collection
    by_name = {s.name: s for s in full}
    assert all(by_name[s.name] == s for s in selected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("just_a_name_no_tabs\n", "no tab"),
        ("SET\tdesc\n", "no genes"),
        ("SET\tdesc\t\t\t\n", "no genes"),
        ("SET\tdesc\tA\t\tB\n", "empty gene field"),
        ("\tdesc\tA\n", "empty gene-set name"),
        ("S1\td\tA\nS2\td\tB\nS1\td\tC\n", "duplicate gene-set name 'S1' (first on line 1)"),
        ("\n\n", "no gene sets"),
    ],
)
def test_malformed_gmt_is_a_clear_error(text, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_gmt(text, source="x.gmt")


def test_gmt_formatting_is_tolerated():
    sets = parse_gmt("S1\td\tA\tB\tA\t\r\n\r\nS2\td\tC\n")
    assert sets == (GeneSet("S1", "d", ("A", "B")), GeneSet("S2", "d", ("C",)))


def test_binary_and_missing_gmt(tmp_path):
    (tmp_path / "b.gmt").write_bytes(b"\x89PNG\x00\x00\xff\xfe")
    with pytest.raises(DataError, match="not a text GMT"):
        read_gmt(tmp_path / "b.gmt")
    with pytest.raises(DataError, match="not found"):
        read_gmt(tmp_path / "nope.gmt")


# -- subspaces and the overlap rule -------------------------------------------------------
def test_default_sets_are_disjoint_and_overlaps_resolved_by_rule():
    gs = load_gene_sets()
    assert not set(gs.tumor) & set(gs.tme)
    assert list(gs.tumor) == sorted(gs.tumor) and list(gs.tme) == sorted(gs.tme)
    assert set(gs.resolved_overlaps) == SHARED_20
    # rule: the side with more sets containing the gene wins, ties go to tumor
    for gene, side in gs.resolved_overlaps.items():
        names = gs.sources[gene]
        n_tumor = sum(n.startswith("TUMOR") for n in names)
        n_tme = len(names) - n_tumor
        assert n_tumor and n_tme
        assert side == ("tumor" if n_tumor >= n_tme else "tme"), gene
        assert gene in (gs.tumor if side == "tumor" else gs.tme)
    assert {g for g, s in gs.resolved_overlaps.items() if s == "tme"} == {"CDKN1A", "HIF1A", "TGFB1"}
    assert gs.sources["TGFB1"][-1] == "TME_ESTIMATE_ImmuneSignature"
    # 480 tumour + 884 TME genes, 20 shared, and ESTIMATE's FYB is Hallmark's FYB1
    assert (len(gs.tumor), len(gs.tme)) == (477, 866)
    assert "FYB" not in gs.genes and "FYB1" in gs.tme
    assert set(gs.sources["FYB1"]) == {"TME_HALLMARK_ALLOGRAFT_REJECTION", "TME_ESTIMATE_ImmuneSignature"}
    # the other renamed ESTIMATE genes are listed under their current symbols
    for old, new in ESTIMATE_RENAMES.items():
        assert old not in gs.genes and new in gs.tme


def test_tie_goes_to_tumor_and_majority_wins():
    sets = [
        GeneSet("TUMOR_A", "", ("X", "Y", "Z")),
        GeneSet("TME_B", "", ("X", "Y")),
        GeneSet("TME_C", "", ("Y", "W")),
    ]
    gs = build_gene_sets(sets)
    assert gs.tumor == ("X", "Z") and gs.tme == ("W", "Y")
    assert dict(gs.resolved_overlaps) == {"X": "tumor", "Y": "tme"}


def test_mapping_option_assigns_ignores_and_reports():
    sets = [
        GeneSet("HALLMARK_E2F_TARGETS", "", ("A", "B")),
        GeneSet("HALLMARK_G2M_CHECKPOINT", "", ("B", "C")),
        GeneSet("StromalSignature", "", ("D",)),
        GeneSet("ImmuneSignature", "", ("E",)),
        GeneSet("TME_unwanted", "", ("F",)),
        GeneSet("OTHER", "", ("G",)),
    ]
    mapping = {"hallmark_e2f_*": "tumor", "HALLMARK_G2M_CHECKPOINT": "Tumour", "*Signature": "tme", "TME_unwanted": "ignore"}
    gs = build_gene_sets(sets, mapping=mapping)
    assert gs.tumor == ("A", "B", "C") and gs.tme == ("D", "E")
    assert gs.ignored_sets == ("TME_unwanted", "OTHER")
    assert "ignored sets" in gs.report() and "OTHER" in gs.report()
    # exact names beat globs, and a mapping overrides the TUMOR/TME prefix
    gs2 = build_gene_sets(
        [GeneSet("TUMOR_X", "", ("A",)), GeneSet("TUMOR_Y", "", ("B",))], mapping={"TUMOR_*": "tumor", "tumor_y": "tme"}
    )
    assert (gs2.tumor, gs2.tme) == (("A",), ("B",))


def test_mapping_errors_and_unused_keys():
    sets = [GeneSet("TUMOR_A", "", ("A",)), GeneSet("TME_B", "", ("B",))]
    with pytest.raises(DataError, match="must be 'tumor', 'tme' or 'ignore'"):
        build_gene_sets(sets, mapping={"TUMOR_A": "stroma"})
    with pytest.warns(DismmWarning, match="NO_SUCH_SET"):
        build_gene_sets(sets, mapping={"NO_SUCH_SET": "tme"})
    with pytest.raises(DataError, match="no gene set is assigned to the tme subspace"):
        build_gene_sets([GeneSet("TUMOR_A", "", ("A",)), GeneSet("OTHER", "", ("B",))])


def test_unprefixed_shared_file_needs_a_mapping(shared_genesets):
    with pytest.raises(DataError, match="no gene set is assigned"):
        load_gene_sets(shared_genesets / "hallmark_selected.gmt")
    mapping = {name: "tumor" for name in HALLMARK_TUMOR} | {"HALLMARK_*": "tme"}
    gs = load_gene_sets(shared_genesets / "hallmark_selected.gmt", mapping=mapping)
    assert (len(gs.tumor), len(gs.tme)) == (477, 688)  # 480 + 705 - 20 shared
    assert len(gs.resolved_overlaps) == 20


# -- shipped defaults ---------------------------------------------------------------------
def _build_module():
    spec = importlib.util.spec_from_file_location("build_default_genesets", REPO / "scripts" / "build_default_genesets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_defaults_equal_a_fresh_build(shared_genesets, tmp_path):
    paths = _build_module().build(shared_genesets, tmp_path)
    packaged = default_gene_sets_path().parent
    assert set(paths) == {"dismm_default.gmt", "hallmark_only.gmt", "ATTRIBUTION.md"}
    for name, path in paths.items():
        assert (packaged / name).read_bytes() == path.read_bytes(), name


def test_build_refuses_changed_inputs(shared_genesets, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("hallmark_selected.gmt", "estimate_si_geneset.gmt"):
        (src / name).write_bytes((shared_genesets / name).read_bytes())
    with open(src / "estimate_si_geneset.gmt", "a") as fh:
        fh.write("EXTRA\tx\tGENE\n")
    with pytest.raises(SystemExit, match="differs from SOURCES.md"):
        _build_module().build(src, tmp_path / "out")


def test_default_path_is_packaged_and_genes_copied_not_typed(shared_genesets):
    path = default_gene_sets_path()
    assert path.is_relative_to(Path(__import__("napari_dismm").__file__).parent)
    shipped = {s.name: s for s in read_gmt(path)}
    originals = {s.name: s for s in read_gmt(shared_genesets / "hallmark_selected.gmt")}
    originals |= {s.name: s for s in read_gmt(shared_genesets / "estimate_si_geneset.gmt")}
    assert len(shipped) == 10
    for name, s in shipped.items():
        assert name.startswith(("TUMOR_", "TME_"))
        original = name.removeprefix("TUMOR_").removeprefix("TME_").removeprefix("ESTIMATE_")
        assert s.genes == originals[original].genes
    hallmark_only = read_gmt(default_gene_sets_path(hallmark_only=True))
    assert [s.name for s in hallmark_only] == [n for n in shipped if "ESTIMATE" not in n]
    attribution = (path.parent / "ATTRIBUTION.md").read_text()
    for needle in ("CC BY 4.0", "GPL-2", "Liberzon", "Yoshihara", "own modelling choice"):
        assert needle in attribution


def test_identifier_kind():
    assert identifier_kind(["ENSG00000141510.17", "ENSG00000012048", "TP53"]) == "Ensembl gene IDs (ENSG...)"
    assert identifier_kind(["X200726_at", "201091_s_at", "age"]).startswith("Affymetrix")
    assert identifier_kind(["TP53", "BRCA1"]) is None


def test_no_warnings_from_defaults():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_gene_sets()
