"""Delimited text tables read in two passes: ids and header first, then only the cells needed.

A TCGA expression matrix has ~20k genes of which the model needs ~1.3k; parsing only those
rows or columns is several times faster than parsing the whole file (see
``benchmarks/omics_read.py``). Also keeps the header exactly as written: pandas silently
renames repeated column names (``S1``, ``S1.1``), which would hide duplicated samples.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from napari_dismm.errors import DataError

_READ_ERRORS = (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, OSError)


@dataclass(frozen=True)
class TextTable:
    """Where a table is and how it is laid out; ``ids`` is the first column as text."""

    path: Path
    sep: str
    gz: bool
    header: tuple[str, ...]
    ids: tuple[str, ...]

    def _options(self) -> dict[str, object]:
        return {"sep": self.sep, "header": 0, "compression": "gzip" if self.gz else None}

    def read(self, *, rows: list[int] | None = None, cols: list[int] | None = None) -> pd.DataFrame:
        """Value cells (without the id column) of these data rows / value columns, by position."""
        usecols = None if cols is None else [0, *(1 + c for c in cols)]
        keep = None if rows is None else {0, *(1 + r for r in rows)}
        try:
            frame = pd.read_csv(
                self.path,
                usecols=usecols,
                skiprows=None if keep is None else (lambda i: i not in keep),
                converters={0: str},
                low_memory=False,
                **self._options(),
            )
            first = [str(v).strip() for v in frame.iloc[:, 0]]
            expected = list(self.ids) if rows is None else [self.ids[r] for r in rows]
            if first != expected:  # e.g. blank lines shifted row numbers: read all, select
                frame = pd.read_csv(
                    self.path, usecols=usecols, converters={0: str}, low_memory=False, **self._options()
                )
                frame = frame.iloc[rows if rows is not None else slice(None)]
        except _READ_ERRORS as exc:
            raise DataError(f"{self.path}: not a readable TSV/CSV table ({str(exc).splitlines()[0]})") from None
        return frame.iloc[:, 1:]


def _separator(path: Path, first_line: str) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".csv"):
        return ","
    if name.endswith((".tsv", ".tab", ".txt")):
        return "\t"
    return "\t" if first_line.count("\t") >= first_line.count(",") else ","


def open_table(path: Path) -> TextTable:
    """Check the file is delimited text and read its header row and id column."""
    if not path.exists():
        raise DataError(f"expression table not found: {path}")
    if not path.is_file():
        raise DataError(f"expression table is not a file: {path}")
    with open(path, "rb") as fh:
        head = fh.read(65536)
    gz = head[:2] == b"\x1f\x8b"
    if not gz and b"\x00" in head:
        raise DataError(f"{path}: not an expression table (binary file); expected TSV/CSV text")
    try:
        with gzip.open(path, "rt", encoding="utf-8") if gz else open(path, encoding="utf-8") as fh:
            first = fh.readline().rstrip("\r\n")
        sep = _separator(path, first)
        header = [c.strip() for c in next(csv.reader([first], delimiter=sep))] if first.strip() else []
        if len(header) < 2:
            raise DataError(
                f"{path}: not an expression table (need an id column and at least one value column)"
            )
        ids = pd.read_csv(
            path, sep=sep, header=0, usecols=[0], dtype=str, keep_default_na=False,
            compression="gzip" if gz else None,
        ).iloc[:, 0]
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: not a readable TSV/CSV table ({str(exc).splitlines()[0]})") from None
    if len(ids) == 0:
        raise DataError(f"{path}: the table has a header but no rows")
    return TextTable(path, sep, gz, tuple(header), tuple(str(v).strip() for v in ids))
