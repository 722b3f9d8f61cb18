"""log1p + z-score of expression, with statistics from the training fold only.

The statistics travel with the model (``to_dict`` goes into config.json as plain JSON
lists), so a test patient or a new cohort is scaled exactly as the training patients were.
A gene absent from a table, or a missing value, becomes the training mean (z = 0) with a
warning: the model still runs, and the user learns what it ran without.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from napari_dismm.errors import DataError, DismmWarning, ModelConfigError
from napari_dismm.omics.expression import ExpressionTable
from napari_dismm.omics.genesets import GeneSets

_FORMAT = "napari_dismm.ExpressionNormaliser"
_VERSION = 1
GeneList = GeneSets | Mapping[str, Sequence[str]] | Sequence[str]


def _preview(items: Sequence[str], n: int = 10) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _as_groups(genes: GeneList) -> dict[str, tuple[str, ...]]:
    """Named gene groups in order: GeneSets give tumor then TME, a plain list one group."""
    if isinstance(genes, GeneSets):
        groups = genes.groups()
    elif isinstance(genes, Mapping):
        groups = {str(k): tuple(v) for k, v in genes.items()}
    elif isinstance(genes, str):
        raise DataError("genes must be a list of gene symbols, not one string")
    else:
        groups = {"genes": tuple(genes)}
    flat = [g for v in groups.values() for g in v]
    repeated = sorted(g for g, n in Counter(flat).items() if n > 1)
    if repeated:
        raise DataError(f"genes listed more than once (groups must be disjoint): {_preview(repeated)}")
    return groups


class ExpressionNormaliser:
    """log1p (optional) then z-score per gene; ``fit`` on training patients only.

    Parameters
    ----------
    log1p:
        Apply ``log(1 + x)`` first. Raw counts / TPM need it; a table that is already
        log-transformed or z-scored has negative values and must use ``log1p=False``.
    min_std:
        A gene whose training standard deviation (population, ddof=0) is below this is
        constant in training; its std is set to 1 so it maps to 0 instead of inf.
    """

    def __init__(self, *, log1p: bool = True, min_std: float = 1e-8) -> None:
        self.log1p = bool(log1p)
        self.min_std = float(min_std)

    # -- fitting ----------------------------------------------------------------------
    def fit(self, table: ExpressionTable, genes: GeneList) -> ExpressionNormaliser:
        """Learn per-gene mean and std from ``table`` (the training fold: use ``table.select``).

        Genes with no value in the training table cannot be scaled and are dropped (warned);
        they are not part of ``genes_``. Missing cells are left out of the statistics.
        """
        groups = _as_groups(genes)
        flat = [g for v in groups.values() for g in v]
        x = self._prepare(table.gene_values(flat), flat, table)
        observed = ~np.isnan(x)
        absent = [g for g, seen in zip(flat, observed.any(axis=0)) if not seen]
        if absent:
            warnings.warn(
                f"{len(absent)} of {len(flat)} genes have no value in the training table and are "
                f"left out of the model input: {_preview(absent)}",
                DismmWarning,
                stacklevel=2,
            )
        dropped = set(absent)
        kept = {name: tuple(g for g in v if g not in dropped) for name, v in groups.items()}
        empty = [name for name, v in kept.items() if not v]
        if empty:
            raise DataError(f"no gene of group(s) {', '.join(empty)} is in the training table")
        cols = [i for i, g in enumerate(flat) if g not in dropped]
        n_missing = int((~observed[:, cols]).sum())
        if n_missing:
            warnings.warn(
                f"{n_missing} missing value(s) in the training table left out of the statistics",
                DismmWarning,
                stacklevel=2,
            )
        x = x[:, cols]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(x, axis=0)
            std = np.nanstd(x, axis=0)
        std = np.where(std < self.min_std, 1.0, std)
        self.groups_ = kept
        self.genes_ = tuple(g for v in kept.values() for g in v)
        self.mean_ = mean.astype(np.float64)
        self.std_ = std.astype(np.float64)
        self.n_samples_ = int(x.shape[0])
        return self

    def _prepare(self, raw: np.ndarray, genes: Sequence[str], table: ExpressionTable) -> np.ndarray:
        if not self.log1p:
            return raw
        negative = np.nan_to_num(raw, nan=0.0) < 0
        if negative.any():
            r, c = (int(i[0]) for i in np.nonzero(negative))
            raise DataError(
                f"{table.source}: negative value {raw[r, c]:.4g} (gene {genes[c]}, patient "
                f"{table.patients[r]}) before log1p: the table looks already log-transformed or "
                "z-scored; use log1p=False (--no-log1p)"
            )
        return np.log1p(raw)

    # -- applying ---------------------------------------------------------------------
    def transform(self, table: ExpressionTable) -> np.ndarray:
        """(n_patients, n_genes) float32 z-scores in ``genes_`` order; gaps become 0."""
        if not hasattr(self, "mean_"):
            raise RuntimeError("ExpressionNormaliser.transform called before fit")
        genes = list(self.genes_)
        absent = table.missing(genes)
        if absent:
            warnings.warn(
                f"{table.source}: {len(absent)} of {len(genes)} model genes are not in the table and "
                f"are imputed with the training mean (z = 0): {_preview(absent)}",
                DismmWarning,
                stacklevel=2,
            )
        x = self._prepare(table.gene_values(genes), genes, table)
        gaps = np.isnan(x)
        absent_set = set(absent)
        gaps[:, [g in absent_set for g in genes]] = False
        if gaps.any():
            r, c = (int(i[0]) for i in np.nonzero(gaps))
            warnings.warn(
                f"{table.source}: {int(gaps.sum())} missing value(s) imputed with the training mean "
                f"(z = 0), e.g. gene {genes[c]} of patient {table.patients[r]}",
                DismmWarning,
                stacklevel=2,
            )
        z = (x - self.mean_) / self.std_
        return np.nan_to_num(z, nan=0.0).astype(np.float32)

    def fit_transform(self, table: ExpressionTable, genes: GeneList) -> np.ndarray:
        return self.fit(table, genes).transform(table)

    # -- storage ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: settings, gene groups in order, and float statistics."""
        if not hasattr(self, "mean_"):
            raise RuntimeError("ExpressionNormaliser.to_dict called before fit")
        # mean/std follow the canonical group order, so reading never depends on how a JSON
        # writer ordered the keys of "groups" (a sorted dump once swapped tumor and TME stats)
        offsets, start = {}, 0
        for name, genes in self.groups_.items():
            offsets[name] = (start, start + len(genes))
            start += len(genes)
        index = np.concatenate([np.arange(*offsets[name]) for name in canonical_group_order(self.groups_)])
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "log1p": self.log1p,
            "min_std": self.min_std,
            "groups": {name: list(self.groups_[name]) for name in canonical_group_order(self.groups_)},
            "mean": [float(v) for v in self.mean_[index]],
            "std": [float(v) for v in self.std_[index]],
            "n_samples": self.n_samples_,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpressionNormaliser:
        """Rebuild from :meth:`to_dict` output; a malformed entry is a :class:`ModelConfigError`."""
        expected = {"format", "version", "log1p", "min_std", "groups", "mean", "std", "n_samples"}
        if not isinstance(data, Mapping) or set(data) != expected:
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ModelConfigError(f"expression normaliser: expected keys {sorted(expected)}, got {got}")
        if data["format"] != _FORMAT or data["version"] != _VERSION:
            raise ModelConfigError(
                f"expression normaliser: unsupported format {data['format']!r} version {data['version']!r}"
            )
        groups = data["groups"]
        if not isinstance(groups, Mapping) or not all(
            isinstance(v, list) and all(isinstance(g, str) for g in v) for v in groups.values()
        ):
            raise ModelConfigError("expression normaliser: 'groups' must map names to lists of gene symbols")
        groups = {name: groups[name] for name in canonical_group_order(groups)}
        genes = [g for v in groups.values() for g in v]
        mean, std = data["mean"], data["std"]
        if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == len(genes)):
            raise ModelConfigError(
                f"expression normaliser: {len(genes)} genes but mean/std of another length"
            )
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in mean + std) or min(std, default=1) <= 0:
            raise ModelConfigError("expression normaliser: mean/std must be finite numbers, std > 0")
        out = cls(log1p=bool(data["log1p"]), min_std=float(data["min_std"]))
        out.groups_ = {str(k): tuple(v) for k, v in groups.items()}
        out.genes_ = tuple(genes)
        out.mean_ = np.asarray(mean, dtype=np.float64)
        out.std_ = np.asarray(std, dtype=np.float64)
        out.n_samples_ = int(data["n_samples"])
        return out

    def __repr__(self) -> str:
        state = f", genes={len(self.genes_)}" if hasattr(self, "genes_") else ""
        return f"ExpressionNormaliser(log1p={self.log1p}, min_std={self.min_std}{state})"


def canonical_group_order(groups) -> list[str]:
    """Tumor first, then TME, then any other group by name: the order of stored statistics."""
    first = [name for name in ("tumor", "tme") if name in groups]
    return first + sorted(name for name in groups if name not in ("tumor", "tme"))
