"""Expression tables: one row of gene values per patient, matched by gene symbol.

The file is a TSV/CSV whose first column holds ids. It may be patients x genes or
genes x patients (TCGA matrices are usually the latter); the orientation is the one in
which the requested genes are found, and the table's ``report`` says which was used.
Several samples of one TCGA patient are averaged (tumour samples preferred over normals).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from napari_dismm.errors import DataError, DismmWarning
from napari_dismm.omics.patients import is_tcga, patient_id, sample_kind
from napari_dismm.omics.symbols import candidate_keys, identifier_kind, identity_key, symbol_key
from napari_dismm.omics.tables import open_table

if TYPE_CHECKING:
    from napari_dismm.omics.normalise import ExpressionNormaliser

PATIENTS_X_GENES = "patients x genes"
GENES_X_PATIENTS = "genes x patients"
# Annotation columns of genes x patients exports (e.g. cBioPortal) that are not samples.
_ANNOTATION_COLUMNS = {"entrez_gene_id", "entrez", "gene_id", "gene_name", "description", "name", "symbol"}


def _preview(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


@dataclass(frozen=True, eq=False)
class ExpressionTable:
    """Values (patients x columns, float64, NaN = missing) with symbol-aware gene lookup."""

    patients: tuple[str, ...]
    columns: tuple[str, ...]
    values: np.ndarray
    orientation: str = PATIENTS_X_GENES
    report: tuple[str, ...] = ()
    source: str = "<table>"
    _index: dict[str, int] = field(init=False, repr=False)
    _rows: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.values.shape != (len(self.patients), len(self.columns)):
            raise DataError(f"{self.source}: values shape {self.values.shape} does not match ids and columns")
        index: dict[str, int] = {}
        for i, name in enumerate(self.columns):
            index.setdefault(symbol_key(name), i)
        rows = {p: i for i, p in enumerate(self.patients)}
        if len(rows) != len(self.patients):
            raise DataError(f"{self.source}: duplicated patient ids")
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_rows", rows)

    # -- genes ----------------------------------------------------------------------
    def locate(self, gene: str) -> int | None:
        """Column index of ``gene`` (case-insensitive, HGNC renames tried), or None."""
        for key in candidate_keys(gene):
            if key in self._index:
                return self._index[key]
        return None

    def missing(self, genes: Iterable[str]) -> list[str]:
        return [g for g in genes if self.locate(g) is None]

    def gene_values(self, genes: Sequence[str]) -> np.ndarray:
        """(n_patients, len(genes)) float64; a gene not in the table is a column of NaN."""
        out = np.full((len(self.patients), len(genes)), np.nan)
        for j, gene in enumerate(genes):
            i = self.locate(gene)
            if i is not None:
                out[:, j] = self.values[:, i]
        return out

    # -- patients -------------------------------------------------------------------
    def select(self, patient_ids: Iterable[str]) -> ExpressionTable:
        """The rows of these patients (ids or TCGA barcodes), in the order given."""
        wanted = [patient_id(p) for p in patient_ids]
        absent = [p for p in wanted if p not in self._rows]
        if absent:
            raise DataError(
                f"{self.source}: {len(absent)} patient(s) have no expression row: {_preview(absent)}"
            )
        idx = [self._rows[p] for p in wanted]
        return ExpressionTable(
            tuple(wanted), self.columns, self.values[idx], self.orientation, self.report, self.source
        )

    def vectors(self, patient_ids: Iterable[str], normaliser: ExpressionNormaliser) -> dict[str, np.ndarray]:
        """Normalised ``{"tumor": (n, G_T), "tme": (n, G_E)}`` float32 for these patients."""
        groups = normaliser.groups_
        if set(groups) != {"tumor", "tme"}:
            raise DataError("the normaliser was not fitted with tumor and TME gene groups")
        z = normaliser.transform(self.select(patient_ids))
        out, start = {}, 0
        for name, genes in groups.items():  # transform's columns follow the normaliser's group order
            out[name] = z[:, start:start + len(genes)]
            start += len(genes)
        return {"tumor": out["tumor"], "tme": out["tme"]}


# -- reading ----------------------------------------------------------------------------
def _numeric(frame: pd.DataFrame, genes: list[str], samples: list[str], path: Path) -> np.ndarray:
    """Samples x genes cells -> float64; a non-numeric entry names its gene and sample."""
    values = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(values) & frame.notna().to_numpy()
    if bad.any():
        r, c = (int(i[0]) for i in np.nonzero(bad))
        raise DataError(
            f"{path}: gene {genes[c]!r} has a non-numeric value {frame.iat[r, c]!r} (id {samples[r]!r}); "
            "is this an expression table (first column = id, then numbers)?"
        )
    return values


def _orient(ids: list[str], header: list[str], genes: list[str] | None) -> tuple[str, int]:
    """Orientation, and how many requested genes that orientation finds."""
    if genes:
        keys = {k for g in genes for k in candidate_keys(g)}
        in_header = sum(symbol_key(h) in keys for h in header)
        in_ids = sum(symbol_key(i) in keys for i in ids)
    else:  # no genes to look for: fall back on where the TCGA barcodes are
        in_ids = sum(map(is_tcga, header))
        in_header = sum(map(is_tcga, ids))
    if in_ids > in_header:
        return GENES_X_PATIENTS, in_ids
    return PATIENTS_X_GENES, in_header


def _kept_genes(names: list[str], genes: list[str], found: int, samples: list[str], path: Path) -> list[int]:
    """Indices of the requested genes among ``names``; explain when none or repeated."""
    if found == 0:
        kind = identifier_kind(names) or identifier_kind(samples)
        hint = (
            f"the table's genes look like {kind}: these are not HGNC symbols and no "
            "mapping ships offline; convert them to symbols first"
            if kind
            else "check that genes are HGNC symbols in the header row or first column"
        )
        raise DataError(f"{path}: none of the {len(genes)} gene-set genes is in the table; {hint}")
    keys = {k for g in genes for k in candidate_keys(g)}
    keep = [i for i, n in enumerate(names) if symbol_key(n) in keys]
    by_key: dict[str, list[str]] = defaultdict(list)
    for i in keep:
        by_key[identity_key(names[i])].append(names[i])
    dupes = [v[0] for v in by_key.values() if len(v) > 1]
    if dupes:
        raise DataError(f"{path}: gene(s) appear more than once in the table: {_preview(dupes)}")
    return keep


def read_expression(
    path: str | os.PathLike[str],
    *,
    genes: Iterable[str] | None = None,
    max_missing_fraction: float = 0.5,
) -> ExpressionTable:
    """Read a TSV/CSV expression table; keep only ``genes`` (all numeric columns if None).

    Raises :class:`DataError` for a file that is not a table, duplicated sample ids,
    non-numeric or infinite values in a kept gene, none of ``genes`` found (naming the
    identifier type when the table uses Ensembl or probe IDs), or more than
    ``max_missing_fraction`` of the kept values missing.
    """
    path = Path(path)
    text = open_table(path)
    gene_list = list(dict.fromkeys(genes)) if genes is not None else None
    ids, header = list(text.ids), list(text.header[1:])
    orientation, found = _orient(ids, header, gene_list)
    report = [f"orientation: {orientation}"]
    sample_cols = list(range(len(header)))
    if orientation == GENES_X_PATIENTS:
        sample_cols = [j for j, c in enumerate(header) if c.lower() not in _ANNOTATION_COLUMNS]
        if len(sample_cols) < len(header):
            skipped = [c for c in header if c.lower() in _ANNOTATION_COLUMNS]
            report.append(f"annotation columns ignored: {', '.join(skipped)}")
        samples, names = [header[j] for j in sample_cols], ids
    else:
        samples, names = ids, header

    repeated = sorted(s for s, n in Counter(samples).items() if n > 1)
    if repeated:
        raise DataError(f"{path}: duplicated sample ids: {_preview(repeated)}")

    def block(gene_idx: list[int] | None) -> pd.DataFrame:
        """Samples x genes cells; only the kept genes are parsed (20k in a TCGA table, ~1k needed)."""
        if orientation == GENES_X_PATIENTS:
            return text.read(rows=gene_idx).iloc[:, sample_cols].T.reset_index(drop=True)
        return text.read(cols=gene_idx)

    if gene_list is not None:
        keep = _kept_genes(names, gene_list, found, samples, path)
        names = [names[i] for i in keep]
        values = _numeric(block(keep), names, samples, path)
    else:
        raw = block(None)
        values = raw.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        usable = np.flatnonzero((~np.isnan(values) | raw.isna().to_numpy()).all(axis=0))
        dropped = [names[c] for c in sorted(set(range(len(names))) - set(usable.tolist()))]
        if dropped:
            report.append(f"non-numeric columns ignored: {_preview(dropped)}")
        if not len(usable):
            raise DataError(f"{path}: not an expression table (no numeric columns)")
        names, values = [names[c] for c in usable], values[:, usable]

    if np.isinf(values).any():
        col = names[int(np.isinf(values).any(axis=0).argmax())]
        raise DataError(f"{path}: infinite value(s) in gene {col!r}")
    missing = float(np.isnan(values).mean()) if values.size else 0.0
    if missing > max_missing_fraction:
        raise DataError(
            f"{path}: {missing:.0%} of the values are missing (more than {max_missing_fraction:.0%}); "
            "is this the right table?"
        )
    patients, values, merged = _by_patient(samples, values)
    report.extend(merged)
    return ExpressionTable(tuple(patients), tuple(names), values, orientation, tuple(report), str(path))


def _by_patient(samples: list[str], values: np.ndarray) -> tuple[list[str], np.ndarray, list[str]]:
    """One row per patient: prefer tumour samples, average several (NaN-aware)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[patient_id(s)].append(i)
    report: list[str] = []
    averaged, dropped = [], []
    rows = np.empty((len(groups), values.shape[1]))
    for r, (patient, idx) in enumerate(groups.items()):
        tumour = [i for i in idx if sample_kind(samples[i]) == "tumor"]
        if tumour and len(tumour) < len(idx):
            dropped.extend(samples[i] for i in idx if i not in tumour)
            idx = tumour
        if len(idx) > 1:
            averaged.append(f"{patient} ({len(idx)})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column stays NaN
            rows[r] = np.nanmean(values[idx], axis=0)
    if dropped:
        report.append(f"non-tumour samples ignored for patients with a tumour sample: {_preview(dropped)}")
    if averaged:
        report.append(f"several samples averaged for {len(averaged)} patient(s): {_preview(averaged)}")
    return list(groups), rows, report


def warn_report(table: ExpressionTable) -> None:
    """Emit the reading report as one :class:`DismmWarning` when something was merged or dropped."""
    notes = [r for r in table.report if not r.startswith("orientation:")]
    if notes:
        warnings.warn(f"{table.source}: " + "; ".join(notes), DismmWarning, stacklevel=2)
