"""Gene identifiers: how a gene-set symbol is matched to an expression-table column.

Matching is on HGNC symbols, case-insensitively. Published gene sets and expression
tables are annotated at different times, so a small table of HGNC renames is applied in
both directions (an old table may carry the old symbol, an old gene set the old one too).
Ensembl IDs and microarray probe IDs are *not* symbols: no mapping ships offline, so when
nothing matches we say which kind of identifier the table seems to use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Previous HGNC symbol -> current HGNC symbol.
# ESTIMATE (2013) symbols renamed since, as listed in shared/genesets/SOURCES.md.
ESTIMATE_RENAMES: dict[str, str] = {
    "GPR124": "ADGRA2",
    "LPPR4": "PLPPR4",
    "ODZ4": "TENM4",
    "TXNDC3": "NME8",
    "WISP1": "CCN4",
    "FYB": "FYB1",
}
# Hallmark renames between MSigDB v7.0 and v2024.1 (SOURCES.md); older expression tables
# (e.g. TCGA legacy RSEM, 2016 annotation) still carry the previous symbols.
HALLMARK_RENAMES: dict[str, str] = {
    "H2AFX": "H2AX",
    "H2AFZ": "H2AZ1",
    "H2AFV": "H2AZ2",
    "HIST1H2BK": "H2BC12",
    "EPRS": "EPRS1",
    "IARS": "IARS1",
    "KARS": "KARS1",
    "PHB": "PHB1",
    "MARCH1": "MARCHF1",
    "WARS": "WARS1",
    "DDX58": "RIGI",
    "METTL7B": "TMT1B",
    "AARS": "AARS1",
    "DARS": "DARS1",
    "RARS": "RARS1",
}
HGNC_RENAMES: dict[str, str] = {**ESTIMATE_RENAMES, **HALLMARK_RENAMES}

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{11}(\.\d+)?$", re.IGNORECASE)
_AFFY_PROBE = re.compile(r"^X?\d+(_[a-z])?_at$", re.IGNORECASE)
_ENTREZ = re.compile(r"^\d+$")


def symbol_key(name: str) -> str:
    """The key two identifiers are compared on.

    Upper case; a TCGA-style ``SYMBOL|ENTREZ`` suffix and an Ensembl version suffix
    (``ENSG00000141510.17``) are dropped so versioned and unversioned IDs meet.
    """
    key = str(name).strip().split("|", 1)[0].upper()
    if _ENSEMBL.match(key):
        key = key.split(".", 1)[0]
    return key


def _alias_classes() -> dict[str, tuple[str, ...]]:
    classes: dict[str, tuple[str, ...]] = {}
    for old, new in HGNC_RENAMES.items():
        pair = (new, old)
        classes[old] = pair
        classes[new] = pair
    return classes


_ALIASES = _alias_classes()


def candidate_keys(symbol: str) -> tuple[str, ...]:
    """Keys to look a gene up under: itself first, then its HGNC rename partner."""
    key = symbol_key(symbol)
    others = tuple(k for k in _ALIASES.get(key, ()) if k != key)
    return (key, *others)


def identity_key(symbol: str) -> str:
    """One key per gene: renamed symbols collapse onto their current HGNC symbol."""
    key = symbol_key(symbol)
    return _ALIASES.get(key, (key,))[0]


def identifier_kind(names: Iterable[str]) -> str | None:
    """Name the identifier type when most names are not gene symbols, else ``None``."""
    names = [str(n).strip() for n in names]
    if not names:
        return None
    kinds = {
        "Ensembl gene IDs (ENSG...)": _ENSEMBL,
        "Affymetrix probe IDs (e.g. 200726_at)": _AFFY_PROBE,
        "numeric (Entrez?) gene IDs": _ENTREZ,
    }
    for label, pattern in kinds.items():
        hits = sum(bool(pattern.match(n.split("|", 1)[0])) for n in names)
        if hits > len(names) / 2:
            return label
    return None
