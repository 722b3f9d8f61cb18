"""Tumor and TME gene lists from GMT gene sets.

DisMM splits a patient's transcriptome into a *tumor* vector and a *tumor
microenvironment* (TME) vector; the two must be disjoint so the subspaces cannot share
an input gene. Sets are assigned to a subspace by name (``TUMOR*`` / ``TME*``, or an
explicit ``mapping``); published sets overlap, so genes found on both sides are resolved
by one rule:

**Overlap rule.** A gene in both subspaces goes to the subspace in which *more* of the
assigned sets contain it; on a tie it goes to **tumor**. Why ties go to tumor: a tied gene
is by definition not a cell-type marker of either side, and in practice such genes are
ubiquitous programme genes (translation, proteasome, cell cycle: EIF3D, PSMA2, BRCA1) that
the TME sets pick up as generic responses, so keeping them out of the TME vector keeps
that vector specific to immune and stromal cells.

With the shipped defaults 20 genes are shared (TGFB1 is also in ESTIMATE's immune list):
17 stay in tumor (15 ties plus MCM7, MYC, NME1) and CDKN1A, HIF1A and TGFB1 (each in more
TME sets than tumor sets) go to TME.

Genes are identified through :func:`~napari_dismm.omics.symbols.identity_key`, so a renamed
symbol and its successor are one gene (ESTIMATE's FYB is Hallmark's FYB1), listed under the
current HGNC symbol.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from importlib.resources import files
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from napari_dismm.errors import DataError, DismmWarning
from napari_dismm.omics.gmt import GeneSet, read_gmt
from napari_dismm.omics.symbols import identity_key, symbol_key

Subspace = Literal["tumor", "tme"]
SUBSPACES: tuple[Subspace, Subspace] = ("tumor", "tme")
_PREFIXES: tuple[tuple[str, Subspace], ...] = (("TUMOR", "tumor"), ("TUMOUR", "tumor"), ("TME", "tme"))
_VALUES: dict[str, Subspace | None] = {"tumor": "tumor", "tumour": "tumor", "tme": "tme", "ignore": None}


@dataclass(frozen=True)
class GeneSets:
    """Disjoint tumor and TME gene lists plus where each gene came from."""

    tumor: tuple[str, ...]
    tme: tuple[str, ...]
    sources: Mapping[str, tuple[str, ...]] = field(repr=False)
    resolved_overlaps: Mapping[str, Subspace] = field(repr=False)
    set_subspace: Mapping[str, Subspace] = field(repr=False)
    ignored_sets: tuple[str, ...] = ()

    @property
    def genes(self) -> tuple[str, ...]:
        """All genes, tumor first: the column order of a normalised vector."""
        return self.tumor + self.tme

    def groups(self) -> dict[str, tuple[str, ...]]:
        return {"tumor": self.tumor, "tme": self.tme}

    def subspace(self, gene: str) -> Subspace:
        if gene in self.tumor:
            return "tumor"
        if gene in self.tme:
            return "tme"
        raise KeyError(gene)

    def report(self) -> str:
        """A few lines a user can read: sizes, sets used and ignored, overlaps moved."""
        lines = [f"gene sets: {len(self.tumor)} tumor genes, {len(self.tme)} TME genes"]
        for sub in SUBSPACES:
            names = [n for n, s in self.set_subspace.items() if s == sub]
            lines.append(f"  {sub} sets ({len(names)}): {', '.join(names)}")
        if self.ignored_sets:
            lines.append(
                f"  ignored sets (no TUMOR/TME prefix or mapping) ({len(self.ignored_sets)}): "
                + ", ".join(self.ignored_sets)
            )
        if self.resolved_overlaps:
            for sub in SUBSPACES:
                moved = sorted(g for g, s in self.resolved_overlaps.items() if s == sub)
                if moved:
                    lines.append(f"  overlaps kept in {sub} ({len(moved)}): {', '.join(moved)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready form (for a model's config.json or a run directory)."""
        return {
            "tumor": list(self.tumor),
            "tme": list(self.tme),
            "sources": {g: list(s) for g, s in self.sources.items()},
            "resolved_overlaps": dict(self.resolved_overlaps),
            "set_subspace": dict(self.set_subspace),
            "ignored_sets": list(self.ignored_sets),
        }


def _subspace_of(name: str, mapping: Mapping[str, str], used: set[str]) -> Subspace | None:
    """Explicit mapping (exact name, then globs in order) wins over the name prefix.

    ``None`` means the set is not used (mapped to "ignore", or no prefix and no mapping).
    """
    upper = name.upper()
    chosen: str | None = None
    for key, value in mapping.items():
        if key.upper() == upper:
            chosen = key
            break
    if chosen is None:
        for key in mapping:
            if fnmatchcase(upper, key.upper()):
                chosen = key
                break
    if chosen is not None:
        used.add(chosen)
        return _VALUES[mapping[chosen].strip().lower()]  # type: ignore[return-value]
    for prefix, sub in _PREFIXES:
        if upper.startswith(prefix):
            return sub
    return None


def _check_mapping(mapping: Mapping[str, str]) -> None:
    for key, value in mapping.items():
        if not isinstance(value, str) or value.strip().lower() not in _VALUES:
            raise DataError(
                f"gene-set mapping {key!r} -> {value!r}: value must be 'tumor', 'tme' or 'ignore'"
            )


def build_gene_sets(sets: Iterable[GeneSet], *, mapping: Mapping[str, str] | None = None) -> GeneSets:
    """Assign sets to subspaces and make the two gene lists disjoint (rule in module doc)."""
    mapping = dict(mapping or {})
    _check_mapping(mapping)
    used_keys: set[str] = set()
    set_subspace: dict[str, Subspace] = {}
    ignored: list[str] = []
    # identity key -> (first-seen spelling, {subspace: [set names]})
    seen: dict[str, tuple[str, dict[str, list[str]]]] = {}
    for s in sets:
        sub = _subspace_of(s.name, mapping, used_keys)
        if sub is None:
            ignored.append(s.name)
            continue
        set_subspace[s.name] = sub
        for gene in s.genes:
            key = identity_key(gene)
            spelling = gene if symbol_key(gene) == key else key  # old alias -> current symbol
            spelling, where = seen.setdefault(key, (spelling, {"tumor": [], "tme": []}))
            if s.name not in where[sub]:
                where[sub].append(s.name)

    unused = [k for k in mapping if k not in used_keys]
    if unused:
        warnings.warn(f"gene-set mapping keys matched no set: {', '.join(unused)}", DismmWarning, stacklevel=2)
    for sub in SUBSPACES:
        if sub not in set_subspace.values():
            raise DataError(
                f"no gene set is assigned to the {sub} subspace: name the GMT's sets TUMOR_... and TME_... "
                "(e.g. TUMOR_MYC_TARGETS, TME_IMMUNE)"
            )

    lists: dict[str, list[str]] = {"tumor": [], "tme": []}
    sources: dict[str, tuple[str, ...]] = {}
    overlaps: dict[str, Subspace] = {}
    for spelling, where in seen.values():
        n_tumor, n_tme = len(where["tumor"]), len(where["tme"])
        chosen: Subspace = "tumor" if n_tumor >= n_tme else "tme"
        if n_tumor and n_tme:
            overlaps[spelling] = chosen
        lists[chosen].append(spelling)
        sources[spelling] = tuple(where["tumor"] + where["tme"])
    for sub in SUBSPACES:
        if not lists[sub]:
            other = "tme" if sub == "tumor" else "tumor"
            named = sorted(n for n, v in set_subspace.items() if v == sub)
            raise DataError(
                f"every gene of the {sub.upper()} set(s) {', '.join(named[:3])}{' ...' if len(named) > 3 else ''} "
                f"is also in a {other.upper()} set, and the overlap rule (a shared gene goes to the side with more "
                f"sets containing it, ties to tumor) moved all {len([g for g, c in overlaps.items() if c == other])} "
                f"to the {other} side: the {sub} vector would be empty; give the {sub.upper()} sets genes of their own"
            )
    return GeneSets(
        tumor=tuple(sorted(lists["tumor"])),
        tme=tuple(sorted(lists["tme"])),
        sources=MappingProxyType(dict(sorted(sources.items()))),
        resolved_overlaps=MappingProxyType(dict(sorted(overlaps.items()))),
        set_subspace=MappingProxyType(set_subspace),
        ignored_sets=tuple(ignored),
    )


def load_gene_sets(
    path: str | os.PathLike[str] | None = None, *, mapping: Mapping[str, str] | None = None
) -> GeneSets:
    """Read a GMT file (the shipped default when ``path`` is None) into :class:`GeneSets`."""
    return build_gene_sets(read_gmt(default_gene_sets_path() if path is None else path), mapping=mapping)


def default_gene_sets_path(*, hallmark_only: bool = False) -> Path:
    """The GMT shipped inside the package (built by scripts/build_default_genesets.py).

    ``hallmark_only`` gives the variant without the ESTIMATE signatures (CC BY 4.0 only).
    """
    name = "hallmark_only.gmt" if hallmark_only else "dismm_default.gmt"
    resource = files("napari_dismm").joinpath("data", "genesets", name)
    path = Path(str(resource))
    if not path.is_file():
        raise DataError(f"the packaged gene-set file is missing: {path} (reinstall napari-dismm)")
    return path
