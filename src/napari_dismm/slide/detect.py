"""Cheap "is this a slide?" check for the napari reader: extension first, then magic bytes.

It must never open the slide (the reader calls it for every dropped path), so it reads at
most 4 bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Extensions OpenSlide opens, plus plain/OME/BigTIFF spellings tifffile reads.
SLIDE_EXTENSIONS = frozenset(
    {
        ".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide",
        ".tif", ".tiff", ".btf", ".tf8", ".ptif", ".qptiff",
    }
)

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def has_tiff_magic(path: str | os.PathLike) -> bool:
    """True when the file starts with a classic or BigTIFF header (either byte order)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in _TIFF_MAGICS
    except OSError:
        return False


def is_slide_path(path: str | os.PathLike) -> bool:
    """True for an existing file with a slide extension or a TIFF header (no decoding)."""
    p = Path(path)
    if not p.is_file():
        return False
    suffixes = "".join(p.suffixes[-2:]).lower()
    if p.suffix.lower() in SLIDE_EXTENSIONS or suffixes in {".ome.tif", ".ome.tiff"}:
        return True
    return has_tiff_magic(p)
