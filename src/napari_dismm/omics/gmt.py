"""GMT files: one gene set per line, ``name<TAB>description<TAB>gene1<TAB>gene2...``.

Reading is strict about what would silently change a model's input (a set with no genes,
two sets with one name, a line that is not tab-separated) and lenient about what is
only formatting (CRLF endings, trailing tabs, blank lines).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from napari_dismm.errors import DataError


@dataclass(frozen=True)
class GeneSet:
    """One named gene set as written in the file (genes in file order, duplicates dropped)."""

    name: str
    description: str
    genes: tuple[str, ...]


def parse_gmt(text: str, *, source: str = "<gmt>") -> tuple[GeneSet, ...]:
    """Parse GMT text; raise :class:`DataError` naming the line of the first problem."""
    sets: list[GeneSet] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        fields = line.split("\t")
        while fields and not fields[-1].strip():
            fields.pop()
        if len(fields) < 2:
            raise DataError(
                f"{source}, line {number}: not a GMT line "
                "(expected name<TAB>description<TAB>gene...; no tab found)"
            )
        name = fields[0].strip()
        if not name:
            raise DataError(f"{source}, line {number}: empty gene-set name")
        if name in first_line:
            raise DataError(
                f"{source}, line {number}: duplicate gene-set name {name!r} "
                f"(first on line {first_line[name]})"
            )
        genes = [g.strip() for g in fields[2:]]
        if any(not g for g in genes):
            raise DataError(f"{source}, line {number}: set {name!r} has an empty gene field")
        if not genes:
            raise DataError(f"{source}, line {number}: set {name!r} has no genes")
        first_line[name] = number
        sets.append(GeneSet(name, fields[1].strip(), tuple(dict.fromkeys(genes))))
    if not sets:
        raise DataError(f"{source}: no gene sets found (empty GMT file)")
    return tuple(sets)


def read_gmt(path: str | os.PathLike[str]) -> tuple[GeneSet, ...]:
    """Read a GMT file (UTF-8); see :func:`parse_gmt`."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"gene-set file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"gene-set path is a directory, not a GMT file: {path}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text GMT file (not UTF-8)") from None
    if "\x00" in text:
        raise DataError(f"{path}: not a text GMT file (binary content)")
    return parse_gmt(text, source=str(path))


def format_gmt(sets: Iterable[GeneSet]) -> str:
    """GMT text with LF endings, the form the shipped default file is written in."""
    lines = []
    for s in sets:
        for field in (s.name, s.description, *s.genes):
            if "\t" in field or "\n" in field:
                raise DataError(f"set {s.name!r}: a field contains a tab or newline")
        lines.append("\t".join((s.name, s.description, *s.genes)))
    return "".join(line + "\n" for line in lines)
