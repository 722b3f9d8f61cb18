"""Build the gene-set files shipped in the package from the curated shared copies.

    python scripts/build_default_genesets.py [SHARED_GENESETS_DIR] [--out DIR]

Every gene is copied by program from the source GMT files (checked against the sha256
recorded in shared/genesets/SOURCES.md); only set names are given a ``TUMOR_`` or ``TME_``
prefix, which is this project's role assignment. Output is byte-deterministic, so a test
can rebuild it and compare. Overlaps between the tumor and TME sets are left as published;
:mod:`napari_dismm.omics.genesets` resolves them when the file is loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from napari_dismm.omics.gmt import GeneSet, format_gmt, read_gmt

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared" / "genesets"
DEFAULT_OUT = REPO / "src" / "napari_dismm" / "data" / "genesets"

HALLMARK_FILE = "hallmark_selected.gmt"
ESTIMATE_FILE = "estimate_si_geneset.gmt"
SHA256 = {  # from shared/genesets/SOURCES.md
    HALLMARK_FILE: "fdcdba2de41d420e464573dcc164774a65de7aca4b1624bc77f0ddf8572e2169",
    ESTIMATE_FILE: "52e701d9b2e97551a6083bae675bca3c43a30e1d46f462eb25ccfdab8d23dc96",
}
# The project's role assignment (SOURCES.md section 3); all other selected sets are TME.
TUMOR_SETS = ("HALLMARK_E2F_TARGETS", "HALLMARK_G2M_CHECKPOINT", "HALLMARK_MYC_TARGETS_V1")
TME_SETS = (
    "HALLMARK_INFLAMMATORY_RESPONSE",
    "HALLMARK_INTERFERON_GAMMA_RESPONSE",
    "HALLMARK_ALLOGRAFT_REJECTION",
    "HALLMARK_EPITHELIAL_MESENCHYMAL_TRANSITION",
    "HALLMARK_ANGIOGENESIS",
)
ESTIMATE_SETS = ("StromalSignature", "ImmuneSignature")

HALLMARK_DESC = "MSigDB Hallmark v2024.1.Hs {name} (CC BY 4.0; Liberzon et al. 2015)"
ESTIMATE_DESC = "ESTIMATE 1.0.13 SI_geneset {name} (GPL-2; Yoshihara et al. 2013)"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pick(sets: tuple[GeneSet, ...], names: tuple[str, ...], source: Path) -> list[GeneSet]:
    by_name = {s.name: s for s in sets}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SystemExit(f"{source}: expected sets not found: {', '.join(missing)}")
    return [by_name[n] for n in names]


def _renamed(s: GeneSet, prefix: str, desc: str) -> GeneSet:
    return GeneSet(f"{prefix}{s.name}", desc.format(name=s.name), s.genes)


def build(shared: Path, out: Path, *, verify: bool = True) -> dict[str, Path]:
    """Write dismm_default.gmt, hallmark_only.gmt and ATTRIBUTION.md into ``out``."""
    sources = {name: shared / name for name in SHA256}
    digests = {}
    for name, path in sources.items():
        if not path.is_file():
            raise SystemExit(f"source gene-set file not found: {path}")
        digests[name] = _sha256(path)
        if verify and digests[name] != SHA256[name]:
            raise SystemExit(f"{path}: sha256 {digests[name]} differs from SOURCES.md; refusing")
    hallmark = read_gmt(sources[HALLMARK_FILE])
    estimate = read_gmt(sources[ESTIMATE_FILE])

    tumor = [_renamed(s, "TUMOR_", HALLMARK_DESC) for s in _pick(hallmark, TUMOR_SETS, sources[HALLMARK_FILE])]
    tme_h = [_renamed(s, "TME_", HALLMARK_DESC) for s in _pick(hallmark, TME_SETS, sources[HALLMARK_FILE])]
    tme_e = [
        _renamed(s, "TME_ESTIMATE_", ESTIMATE_DESC) for s in _pick(estimate, ESTIMATE_SETS, sources[ESTIMATE_FILE])
    ]
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "dismm_default.gmt": format_gmt(tumor + tme_h + tme_e),
        "hallmark_only.gmt": format_gmt(tumor + tme_h),
    }
    paths = {}
    for name, text in written.items():
        paths[name] = out / name
        paths[name].write_bytes(text.encode("utf-8"))
    out_digests = {name: _sha256(p) for name, p in paths.items()}
    paths["ATTRIBUTION.md"] = out / "ATTRIBUTION.md"
    paths["ATTRIBUTION.md"].write_bytes(
        _attribution(tumor, tme_h, tme_e, digests, out_digests).encode("utf-8")
    )
    return paths


def _table(sets: list[GeneSet], origin: str, role: str) -> list[str]:
    return [f"| `{s.name}` | {origin} | {len(s.genes)} | {role} |" for s in sets]


def _attribution(tumor, tme_h, tme_e, digests, out_digests) -> str:
    rows = (
        _table(tumor, "MSigDB Hallmark", "tumor")
        + _table(tme_h, "MSigDB Hallmark", "TME")
        + _table(tme_e, "ESTIMATE", "TME")
    )
    return "\n".join(
        [
            "# Shipped gene sets: sources, citations, licences",
            "",
            "Written by `scripts/build_default_genesets.py` from the curated copies described in",
            "`shared/genesets/SOURCES.md`; no gene was typed, added, removed or renamed. Only the set",
            "names carry a `TUMOR_` / `TME_` prefix: assigning each set to the tumor or the tumor",
            "microenvironment (TME) subspace is **this project's own modelling choice**, not part of",
            "MSigDB or ESTIMATE. The sets overlap as published (21 genes shared between tumor and",
            "TME); `napari_dismm.omics.genesets` makes the two gene lists disjoint when loading",
            "(a gene goes to the side with more sets containing it; ties go to tumor).",
            "",
            "| set | source | genes | subspace |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
            "Files: `dismm_default.gmt` (all sets above), `hallmark_only.gmt` (the Hallmark sets",
            "only, for users who want CC BY 4.0 data alone).",
            "",
            "## MSigDB Hallmark (release 2024.1.Hs)",
            "",
            "- Liberzon A, Birger C, Thorvaldsdóttir H, Ghandi M, Mesirov JP, Tamayo P. The Molecular",
            "  Signatures Database (MSigDB) hallmark gene set collection. Cell Syst 2015;1(6):417-425.",
            "  doi:10.1016/j.cels.2015.12.004.",
            "- Subramanian A et al. Gene set enrichment analysis. PNAS 2005;102(43):15545-15550.",
            "  doi:10.1073/pnas.0506580102.",
            "- Licence: **Creative Commons Attribution 4.0 International (CC BY 4.0)**, per the MSigDB",
            "  License Terms (copyright (c) 2004-2023 Broad Institute, Inc., Massachusetts Institute",
            "  of Technology, and Regents of the University of California). The Hallmark collection",
            "  contains none of the KEGG/BioCarta/AAAS sets that carry extra restrictions.",
            "- Copy used: the MSigDB file `h.all.v2024.1.Hs.symbols.gmt` as redistributed in the",
            "  leapR R package (pnnl/leapR); not checked against Broad's own download (see SOURCES.md).",
            "",
            "## ESTIMATE stromal and immune signatures",
            "",
            "- Yoshihara K, Shahmoradgoli M, Martínez E, et al., Verhaak RGW. Inferring tumour purity",
            "  and stromal and immune cell admixture from expression data. Nat Commun 2013;4:2612.",
            "  doi:10.1038/ncomms3612.",
            "- Source: R package `estimate` 1.0.13, `inst/extdata/SI_geneset.gmt` (R-Forge project",
            "  `estimate`), line endings converted from CRLF to LF.",
            "- Licence: **GPL-2** (package DESCRIPTION; `inst/COPYRIGHTS`: Copyright 2013-2016, MD",
            "  Anderson Cancer Center). This package ships the two gene lists, unchanged, under that",
            "  licence with this attribution; that is the project's decision. Use `hallmark_only.gmt`",
            "  if GPL-2 data is not acceptable to you.",
            "- The lists use 2013 HGNC symbols (GPR124, LPPR4, ODZ4, TXNDC3, WISP1, FYB); matching",
            "  against an expression table also tries their current symbols",
            "  (`napari_dismm.omics.symbols.ESTIMATE_RENAMES`).",
            "",
            "## Checksums (sha256)",
            "",
            *[f"- input `{name}`: `{digest}`" for name, digest in digests.items()],
            *[f"- output `{name}`: `{digest}`" for name, digest in out_digests.items()],
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shared", nargs="?", type=Path, default=DEFAULT_SHARED, help="shared/genesets directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the inputs")
    args = parser.parse_args(argv)
    for path in build(args.shared, args.out, verify=not args.no_verify).values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
