"""Patient identifiers: TCGA sample barcodes are matched to patients by their first 12
characters (``TCGA-02-0001-01A-01R`` -> ``TCGA-02-0001``), other ids are used as written."""

from __future__ import annotations

import re

_TCGA = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}", re.IGNORECASE)


def is_tcga(sample_id: str) -> bool:
    return bool(_TCGA.match(str(sample_id).strip()))


def patient_id(sample_id: str) -> str:
    """The patient a sample belongs to: ``TCGA-XX-XXXX`` (upper case) for TCGA barcodes."""
    text = str(sample_id).strip()
    return text[:12].upper() if _TCGA.match(text) else text


def sample_kind(sample_id: str) -> str:
    """``"tumor"``, ``"normal"``, ``"control"`` from a TCGA sample-type code, else ``"unknown"``.

    Codes 01-09 are tumour samples, 10-19 normal tissue, 20-29 controls (TCGA code tables);
    a patient's normal sample must not be averaged into its tumour expression.
    """
    text = str(sample_id).strip()
    if not _TCGA.match(text) or len(text) < 15 or text[12] != "-" or not text[13:15].isdigit():
        return "unknown"
    code = int(text[13:15])
    if 1 <= code <= 9:
        return "tumor"
    if 10 <= code <= 19:
        return "normal"
    return "control"
